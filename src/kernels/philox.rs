//! Philox4x32-10 (Salmon, Moraes, Dror, Shaw: "Parallel random numbers: as easy as 1, 2, 3",
//! SC'11), the counter-based generator the sampling kernel draws with: a request's seed is the
//! key and its step the counter, so a token's draw depends on nothing but those two.

const MULTIPLIERS: [u32; 2] = [0xD251_1F53, 0xCD9E_8D57];
const KEY_BUMPS: [u32; 2] = [0x9E37_79B9, 0xBB67_AE85];

/// The four output words of Philox4x32-10 for `counter` under `key`.
pub fn philox4x32_10(counter: [u32; 4], key: [u32; 2]) -> [u32; 4] {
    let [mut c0, mut c1, mut c2, mut c3] = counter;
    let [mut k0, mut k1] = key;
    for _ in 0..10 {
        let p0 = u64::from(MULTIPLIERS[0]) * u64::from(c0);
        let p1 = u64::from(MULTIPLIERS[1]) * u64::from(c2);
        let (hi0, lo0) = ((p0 >> 32) as u32, p0 as u32);
        let (hi1, lo1) = ((p1 >> 32) as u32, p1 as u32);
        (c0, c1, c2, c3) = (hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0);
        k0 = k0.wrapping_add(KEY_BUMPS[0]);
        k1 = k1.wrapping_add(KEY_BUMPS[1]);
    }
    [c0, c1, c2, c3]
}

/// The uniform draw in [0, 1) of step `step` of the stream seeded `seed`: the top 24 bits of the
/// first word, so the float is exact.
pub fn uniform(seed: u64, step: u64) -> f32 {
    let word = philox4x32_10(
        [step as u32, (step >> 32) as u32, 0, 0],
        [seed as u32, (seed >> 32) as u32],
    )[0];
    (word >> 8) as f32 * (1.0 / 16_777_216.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The known-answer vectors of the Random123 library (kat_vectors, philox4x32_10).
    #[test]
    fn matches_the_random123_known_answers() {
        assert_eq!(
            philox4x32_10([0; 4], [0; 2]),
            [0x6627_e8d5, 0xe169_c58d, 0xbc57_ac4c, 0x9b00_dbd8]
        );
        assert_eq!(
            philox4x32_10([u32::MAX; 4], [u32::MAX; 2]),
            [0x408f_276d, 0x41c8_3b0e, 0xa20b_c7c6, 0x6d54_51fd]
        );
        assert_eq!(
            philox4x32_10(
                [0x243f_6a88, 0x85a3_08d3, 0x1319_8a2e, 0x0370_7344],
                [0xa409_3822, 0x299f_31d0]
            ),
            [0xd16c_fe09, 0x94fd_cceb, 0x5001_e420, 0x2412_6ea1]
        );
    }

    #[test]
    fn uniform_draws_are_in_range_and_spread() {
        let draws: Vec<f32> = (0..10_000).map(|step| uniform(42, step)).collect();
        assert!(draws.iter().all(|&u| (0.0..1.0).contains(&u)));
        let mean = draws.iter().sum::<f32>() / draws.len() as f32;
        assert!((mean - 0.5).abs() < 0.01, "{mean}");
        assert_ne!(uniform(1, 0), uniform(2, 0));
        assert_eq!(uniform(7, 3), uniform(7, 3));
    }
}
