//! Where refresh jobs may send requests. A teacher URL must be loopback (a teacher beside the
//! server, plain http allowed) or https to a host matching `--teacher-allow`, so an admin
//! token cannot become a way into the hospital's internal network. Redirects are not followed
//! (see [`super::teacher`]), and the API key a job sends comes only from an environment
//! variable named `TEACHER_*`, so a job cannot send the server's other secrets anywhere.

use reqwest::Url;
use url::Host;

/// Prefix of the environment variables `teacher.api_key_env` may name.
pub const KEY_ENV_PREFIX: &str = "TEACHER_";

/// A host pattern of `--teacher-allow`.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Pattern {
    /// `*`: every host.
    Any,
    /// `api.example.com` (any port), or `api.example.com:8443`.
    Host(String, Option<u16>),
    /// `*.example.com`: its subdomains.
    Subdomains(String, Option<u16>),
}

/// The hosts refresh jobs may call.
#[derive(Debug, Clone, Default)]
pub struct OutboundPolicy {
    allow: Vec<Pattern>,
}

impl OutboundPolicy {
    /// Parses `--teacher-allow` patterns: `host`, `host:port`, `*.domain`, or `*`.
    pub fn new(patterns: &[String]) -> Result<Self, String> {
        let mut allow = Vec::new();
        for raw in patterns.iter().map(|p| p.trim()).filter(|p| !p.is_empty()) {
            if raw == "*" {
                allow.push(Pattern::Any);
                continue;
            }
            let (host, port) = match raw.rsplit_once(':') {
                Some((host, port)) if !host.contains(':') => (
                    host,
                    Some(
                        port.parse::<u16>()
                            .map_err(|_| format!("--teacher-allow {raw:?}: bad port"))?,
                    ),
                ),
                _ => (raw, None),
            };
            let host = host.to_ascii_lowercase();
            let valid = |h: &str| !h.is_empty() && h.chars().all(|c| c.is_ascii_alphanumeric() || "-.".contains(c));
            match host.strip_prefix("*.") {
                Some(domain) if valid(domain) => allow.push(Pattern::Subdomains(domain.to_string(), port)),
                None if valid(&host) => allow.push(Pattern::Host(host, port)),
                _ => return Err(format!("--teacher-allow {raw:?}: use host, host:port, *.domain or *")),
            }
        }
        Ok(Self { allow })
    }

    /// Whether a refresh job may call `url`; the error says why not and how to allow it.
    pub fn check(&self, url: &str) -> Result<(), String> {
        let parsed = Url::parse(url).map_err(|e| format!("teacher.url {url:?} is not a URL: {e}"))?;
        if !matches!(parsed.scheme(), "http" | "https") {
            return Err(format!("teacher.url {url:?} must be an http(s) URL"));
        }
        if !parsed.username().is_empty() || parsed.password().is_some() {
            return Err("teacher.url must not carry credentials; use teacher.api_key_env".into());
        }
        let host = parsed
            .host()
            .ok_or_else(|| format!("teacher.url {url:?} has no host"))?;
        if is_loopback(&host) {
            return Ok(());
        }
        let name = match &host {
            Host::Domain(d) => d.to_ascii_lowercase(),
            Host::Ipv4(ip) => ip.to_string(),
            Host::Ipv6(ip) => ip.to_string(),
        };
        let port = parsed.port_or_known_default();
        let allowed = self.allow.iter().any(|p| match p {
            Pattern::Any => true,
            Pattern::Host(h, want) => *h == name && want.is_none_or(|w| Some(w) == port),
            Pattern::Subdomains(d, want) => {
                name.strip_suffix(d.as_str()).is_some_and(|rest| rest.ends_with('.'))
                    && want.is_none_or(|w| Some(w) == port)
            }
        });
        if !allowed {
            return Err(format!(
                "teacher host {name} is not allowed: refresh jobs may call loopback and the hosts of \
                 --teacher-allow (start the server with --teacher-allow {name})"
            ));
        }
        if parsed.scheme() != "https" {
            return Err(format!(
                "teacher.url {url:?}: a teacher off this machine must be called over https"
            ));
        }
        Ok(())
    }
}

fn is_loopback(host: &Host<&str>) -> bool {
    match host {
        Host::Domain(d) => d.eq_ignore_ascii_case("localhost"),
        Host::Ipv4(ip) => ip.is_loopback(),
        Host::Ipv6(ip) => ip.is_loopback(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_is_allowed_and_other_hosts_only_over_https_when_listed() {
        let none = OutboundPolicy::new(&[]).unwrap();
        for ok in [
            "http://127.0.0.1:8000/v1",
            "http://localhost/v1",
            "http://[::1]:9/v1",
            "http://0x7f.1/v1",
        ] {
            assert!(none.check(ok).is_ok(), "{ok}");
        }
        for refused in [
            "https://api.deepseek.com/v1",
            "http://10.0.0.5/v1",
            "http://169.254.169.254/latest",
            "http://127.0.0.1.nip.io/v1",
        ] {
            let e = none.check(refused).unwrap_err();
            assert!(e.contains("--teacher-allow"), "{refused}: {e}");
        }
        assert!(none.check("file:///etc/passwd").is_err());
        assert!(
            none.check("http://user:pw@127.0.0.1/v1")
                .unwrap_err()
                .contains("credentials")
        );

        let listed = OutboundPolicy::new(&["api.deepseek.com".into(), "*.corp.example:8443".into()]).unwrap();
        assert!(listed.check("https://API.deepseek.com/v1").is_ok());
        assert!(
            listed
                .check("http://api.deepseek.com/v1")
                .unwrap_err()
                .contains("https")
        );
        assert!(listed.check("https://vllm.corp.example:8443/v1").is_ok());
        assert!(listed.check("https://vllm.corp.example/v1").is_err());
        assert!(listed.check("https://corp.example:8443/v1").is_err());
        assert!(listed.check("https://evilcorp.example:8443/v1").is_err());
        assert!(
            OutboundPolicy::new(&["*".into()])
                .unwrap()
                .check("https://anything.example/v1")
                .is_ok()
        );
        for bad in ["a b", "host:port", "*.", "http://x"] {
            assert!(OutboundPolicy::new(&[bad.into()]).is_err(), "{bad}");
        }
    }
}
