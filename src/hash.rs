//! Stable 64-bit hashes: the same across runs, platforms and Rust versions,
//! for everything that is persisted or decides placement. FNV-1a (a byte at a
//! time) for short keys: partitions, segment ids, the market fingerprint.
//! `words_hash` (eight bytes at a time) for whole documents: the change gate.

pub const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

/// Continues a hash over more bytes.
pub fn fnv1a_extend(mut hash: u64, bytes: &[u8]) -> u64 {
    for byte in bytes {
        hash ^= *byte as u64;
        hash = hash.wrapping_mul(FNV_PRIME);
    }
    hash
}

pub fn fnv1a(bytes: &[u8]) -> u64 {
    fnv1a_extend(FNV_OFFSET, bytes)
}

const WORD_MULTIPLIER: u64 = 0x9e37_79b9_7f4a_7c15;

/// A hash of `bytes` read eight at a time (little-endian words, the last one
/// zero-padded, the length mixed in): each word is folded in with a 64x64 ->
/// 128-bit multiply whose halves are xor-ed (as in wyhash; a plain wrapping
/// multiply never carries a high bit down, so flips in the top bits of
/// neighbouring words cancelled), finished with MurmurHash3's avalanche. The
/// change gate hashes every document it sees, a few hundred bytes each, and
/// FNV's byte-at-a-time multiply chain was 3 % of a run.
pub fn words_hash(bytes: &[u8]) -> u64 {
    let mut hash = (bytes.len() as u64).wrapping_mul(WORD_MULTIPLIER);
    let mut words = bytes.chunks_exact(8);
    for word in &mut words {
        let word = u64::from_le_bytes(word.try_into().expect("chunks of 8"));
        hash = folded_multiply(hash ^ word, WORD_MULTIPLIER);
    }
    let tail = words.remainder();
    if !tail.is_empty() {
        let mut last = [0u8; 8];
        last[..tail.len()].copy_from_slice(tail);
        hash = folded_multiply(hash ^ u64::from_le_bytes(last), WORD_MULTIPLIER);
    }
    avalanche(hash)
}

fn folded_multiply(a: u64, b: u64) -> u64 {
    let product = a as u128 * b as u128;
    (product as u64) ^ ((product >> 64) as u64)
}

/// MurmurHash3's fmix64: every input bit affects every output bit.
fn avalanche(mut hash: u64) -> u64 {
    hash ^= hash >> 33;
    hash = hash.wrapping_mul(0xff51_afd7_ed55_8ccd);
    hash ^= hash >> 33;
    hash = hash.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    hash ^ (hash >> 33)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_hash_is_pinned_because_it_is_persisted() {
        // a stored gate hash must mean the same after an upgrade: a change to
        // the function would re-emit every listing once
        assert_eq!(words_hash(b""), 0);
        assert_eq!(words_hash(b",\"price\":12500"), 0xe167_3925_153a_7035);
    }

    #[test]
    fn words_hash_separates_close_documents() {
        let base = br#","price":12500,"band":"fair","valuation":13120.5,"days_to_sell":23"#;
        let mut seen = std::collections::HashSet::new();
        assert!(seen.insert(words_hash(base)));
        // every single-bit flip, every truncation and zero padding give new
        // hashes (a wrapping multiply alone failed this: bit 63 of one word and
        // bit 36 of the next cancelled)
        for i in 0..base.len() {
            for bit in 0..8 {
                let mut flipped = base.to_vec();
                flipped[i] ^= 1 << bit;
                assert!(seen.insert(words_hash(&flipped)), "flip at {i}.{bit}");
            }
            assert!(seen.insert(words_hash(&base[..i])), "prefix {i}");
        }
        let mut padded = base.to_vec();
        padded.push(0);
        assert!(seen.insert(words_hash(&padded)));
    }
}
