//! Turning generated token ids into text as they arrive: incremental detokenisation that never
//! emits half a UTF-8 character, and stop strings that are held back until they cannot match.

use tokenizers::Tokenizer;

/// Decodes a growing token sequence into text deltas.
///
/// Decoding one token at a time breaks byte-level tokens that split a character and drops the
/// spaces some decoders add between tokens, so each step decodes a short window of recent tokens
/// and emits only what is new (the approach of TGI's router).
pub struct IncrementalDecoder {
    ids: Vec<u32>,
    prefix_offset: usize,
    read_offset: usize,
}

impl Default for IncrementalDecoder {
    fn default() -> Self {
        Self::new()
    }
}

impl IncrementalDecoder {
    /// An empty decoder.
    pub fn new() -> Self {
        Self {
            ids: Vec::new(),
            prefix_offset: 0,
            read_offset: 0,
        }
    }

    /// Adds `token` and returns the text it completes (possibly empty while a character is
    /// still partial).
    pub fn push(&mut self, tokenizer: &Tokenizer, token: u32) -> Result<String, tokenizers::Error> {
        self.ids.push(token);
        let prefix = tokenizer.decode(&self.ids[self.prefix_offset..self.read_offset], false)?;
        let full = tokenizer.decode(&self.ids[self.prefix_offset..], false)?;
        if full.len() > prefix.len() && !full.ends_with('\u{FFFD}') && full.is_char_boundary(prefix.len()) {
            let delta = full[prefix.len()..].to_string();
            self.prefix_offset = self.read_offset;
            self.read_offset = self.ids.len();
            Ok(delta)
        } else {
            Ok(String::new())
        }
    }

    /// The text still withheld at the end of the answer (bytes of an unfinished character, as
    /// U+FFFD, the way the tokenizer decodes them), so that everything emitted adds up to the
    /// decoding of every pushed token.
    pub fn flush(&mut self, tokenizer: &Tokenizer) -> Result<String, tokenizers::Error> {
        if self.read_offset == self.ids.len() {
            return Ok(String::new());
        }
        let prefix = tokenizer.decode(&self.ids[self.prefix_offset..self.read_offset], false)?;
        let full = tokenizer.decode(&self.ids[self.prefix_offset..], false)?;
        self.prefix_offset = self.read_offset;
        self.read_offset = self.ids.len();
        Ok(full.get(prefix.len()..).unwrap_or_default().to_string())
    }
}

/// Finds stop strings in streamed text, holding back any tail that could still become one.
pub struct StopMatcher {
    stops: Vec<String>,
    text: String,
    emitted: usize,
}

/// What to send after a push.
#[derive(Debug, PartialEq, Eq)]
pub struct StopStep {
    /// Text that is now safe to send.
    pub emit: String,
    /// Whether a stop string was found (the text before it is in `emit`, the rest is dropped).
    pub stopped: bool,
}

impl StopMatcher {
    /// A matcher for `stops` (empty strings are ignored).
    pub fn new(stops: Vec<String>) -> Self {
        Self {
            stops: stops.into_iter().filter(|s| !s.is_empty()).collect(),
            text: String::new(),
            emitted: 0,
        }
    }

    /// Appends `delta` and returns what can be sent.
    pub fn push(&mut self, delta: &str) -> StopStep {
        // A stop string may straddle the previous text: search from the earliest place it could
        // start.
        let longest = self.stops.iter().map(String::len).max().unwrap_or(0);
        let mut search_from = self.text.len().saturating_sub(longest);
        while !self.text.is_char_boundary(search_from) {
            search_from -= 1;
        }
        self.text.push_str(delta);
        let found = self
            .stops
            .iter()
            .filter_map(|s| self.text[search_from..].find(s.as_str()))
            .min();
        if let Some(at) = found {
            let end = search_from + at;
            let emit = self.text[self.emitted.min(end)..end].to_string();
            self.emitted = self.text.len();
            return StopStep { emit, stopped: true };
        }
        let hold = self.held_back();
        let safe = self.text.len() - hold;
        let emit = self.text[self.emitted..safe].to_string();
        self.emitted = safe;
        StopStep { emit, stopped: false }
    }

    /// The text held back at the end of generation (it never became a stop string).
    pub fn flush(&mut self) -> String {
        let rest = self.text[self.emitted..].to_string();
        self.emitted = self.text.len();
        rest
    }

    /// Length of the longest tail of the text that is a proper prefix of a stop string.
    fn held_back(&self) -> usize {
        self.stops
            .iter()
            .flat_map(|s| {
                (1..s.len())
                    .rev()
                    .filter(|&n| s.is_char_boundary(n))
                    .map(move |n| &s[..n])
            })
            .filter(|prefix| self.text.ends_with(prefix))
            .map(str::len)
            .max()
            .unwrap_or(0)
            .min(self.text.len() - self.emitted)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(stops: &[&str], deltas: &[&str]) -> (String, bool) {
        let mut m = StopMatcher::new(stops.iter().map(|s| s.to_string()).collect());
        let mut out = String::new();
        for d in deltas {
            let step = m.push(d);
            out.push_str(&step.emit);
            if step.stopped {
                return (out, true);
            }
        }
        out.push_str(&m.flush());
        (out, false)
    }

    #[test]
    fn stop_across_deltas_is_cut() {
        assert_eq!(run(&["\n\n"], &["a\n", "\nb"]), ("a".to_string(), true));
        assert_eq!(run(&["END"], &["xE", "N", "Dy"]), ("x".to_string(), true));
    }

    #[test]
    fn held_back_text_is_flushed_when_no_stop_matches() {
        assert_eq!(run(&["END"], &["xE", "N"]), ("xEN".to_string(), false));
        assert_eq!(run(&[], &["héllo", " ✓"]), ("héllo ✓".to_string(), false));
    }

    #[test]
    fn held_back_text_is_released_once_it_diverges() {
        let mut m = StopMatcher::new(vec!["END".into()]);
        assert_eq!(m.push("aE").emit, "a");
        assert_eq!(m.push("x").emit, "Ex");
    }
}
