//! Byte searches eight bytes at a time, for the two scans that walk every
//! record's JSON strings: the file source's search for the key (every
//! worker walks every line up to it) and the decoder's reader of plain
//! strings. A byte loop took about seven instructions a byte there; a word
//! takes about twenty for eight bytes, and the strings of a record are
//! mostly one or two words long. `memchr` was tried for the key scan and
//! was slower (its call and setup cost more than a short string's bytes,
//! `docs/benchmarks.md`, stop 28); these are inlined and set up nothing.
//!
//! Each search flags, in a little-endian word, the bytes that match with
//! the classic "has a zero byte" test (`(x - 0x01..) & !x & 0x80..`).
//! That test can also flag a byte *above* a true match (the subtraction's
//! borrow runs upwards), never one below it, so the lowest flagged byte is
//! always the first true match, which is the only one used.

const ONES: u64 = 0x0101_0101_0101_0101;
const HIGHS: u64 = 0x8080_8080_8080_8080;

/// The high bit of each byte of `word` that equals `byte` (and perhaps of
/// bytes above the first that does; see the module comment).
#[inline(always)]
fn equal_bytes(word: u64, byte: u8) -> u64 {
    let x = word ^ (ONES * byte as u64);
    x.wrapping_sub(ONES) & !x & HIGHS
}

/// The high bit of each byte of `word` below 0x20 (a control character)
/// (and perhaps of bytes above the first; see the module comment). Bytes
/// of 0x80 and up have their high bit set in `word`, so `!word` clears them.
#[inline(always)]
fn control_bytes(word: u64) -> u64 {
    word.wrapping_sub(ONES * 0x20) & !word & HIGHS
}

#[inline(always)]
fn word_at(bytes: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(bytes[at..at + 8].try_into().expect("eight bytes"))
}

/// The first index at or after `from` whose byte is `"` or `\`, or
/// `bytes.len()` if there is none (`from` itself when `from` is past the end).
#[inline]
pub fn quote_or_backslash(bytes: &[u8], mut from: usize) -> usize {
    while from + 8 <= bytes.len() {
        let word = word_at(bytes, from);
        let found = equal_bytes(word, b'"') | equal_bytes(word, b'\\');
        if found != 0 {
            return from + (found.trailing_zeros() / 8) as usize;
        }
        from += 8;
    }
    while from < bytes.len() && !matches!(bytes[from], b'"' | b'\\') {
        from += 1;
    }
    from
}

/// The first index at or after `from` whose byte is `"`, `\` or a control
/// character (below 0x20, which JSON does not allow unescaped in a string),
/// or `None` if there is none.
#[inline]
pub fn string_stop(bytes: &[u8], mut from: usize) -> Option<usize> {
    while from + 8 <= bytes.len() {
        let word = word_at(bytes, from);
        let found = equal_bytes(word, b'"') | equal_bytes(word, b'\\') | control_bytes(word);
        if found != 0 {
            return Some(from + (found.trailing_zeros() / 8) as usize);
        }
        from += 8;
    }
    while from < bytes.len() {
        if matches!(bytes[from], b'"' | b'\\' | 0..=0x1f) {
            return Some(from);
        }
        from += 1;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The byte loops these replace: the oracle.
    fn quote_or_backslash_by_bytes(bytes: &[u8], from: usize) -> usize {
        (from..bytes.len())
            .find(|&i| matches!(bytes[i], b'"' | b'\\'))
            .unwrap_or(bytes.len().max(from))
    }

    fn string_stop_by_bytes(bytes: &[u8], from: usize) -> Option<usize> {
        (from..bytes.len()).find(|&i| matches!(bytes[i], b'"' | b'\\' | 0..=0x1f))
    }

    /// Every length up to 40 and every start, over bytes drawn mostly from
    /// the ones that matter and their neighbours (so borrows and the high
    /// bit get exercised): 0x00, 0x1f, 0x20, 0x21, `"`, `#`, `[`, `\`, `]`,
    /// 0x7f, 0x80, 0xff, and a letter.
    #[test]
    fn the_word_searches_find_what_the_byte_loops_find() {
        let alphabet = [
            0x00u8, 0x01, 0x1f, 0x20, 0x21, b'"', b'#', b'[', b'\\', b']', 0x7f, 0x80, 0xa2, 0xdc,
            0xff, b'a',
        ];
        // a fixed xorshift: the same cases every run
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let mut checked = 0;
        for _ in 0..20_000 {
            let length = (next() % 41) as usize;
            // mostly plain letters, so that matches sit at every position of a word
            let bytes: Vec<u8> = (0..length)
                .map(|_| {
                    let draw = next();
                    if draw % 4 == 0 {
                        alphabet[(draw >> 8) as usize % alphabet.len()]
                    } else {
                        b'a' + (draw >> 8) as u8 % 26
                    }
                })
                .collect();
            for from in 0..=length + 2 {
                assert_eq!(
                    quote_or_backslash(&bytes, from),
                    quote_or_backslash_by_bytes(&bytes, from),
                    "{bytes:?} from {from}"
                );
                assert_eq!(
                    string_stop(&bytes, from),
                    string_stop_by_bytes(&bytes, from),
                    "{bytes:?} from {from}"
                );
                checked += 1;
            }
        }
        assert!(checked > 400_000);
    }

    #[test]
    fn a_match_in_every_lane_of_a_word_is_found_first() {
        for position in 0..16 {
            for byte in [b'"', b'\\', 0x00, 0x1f] {
                let mut bytes = vec![b'x'; 16];
                bytes[position] = byte;
                // a byte the borrow could flag falsely, just above the match
                if position + 1 < 16 {
                    bytes[position + 1] = 0x01;
                }
                assert_eq!(string_stop(&bytes, 0), Some(position));
                let expected = if matches!(byte, b'"' | b'\\') {
                    position
                } else {
                    16
                };
                assert_eq!(quote_or_backslash(&bytes, 0), expected);
            }
        }
    }
}
