//! How the members arrangement lays its members out: all of a batch's member
//! bytes in one buffer, with one end offset per member.
//!
//! Differential's default layout keeps a `Vec<Member>`: 56 bytes per member
//! (a 48-byte inline `SmallVec` and its length) for a member of about 20
//! bytes in the listings topology (price and odometer as varints, the
//! partition, a 10-byte listing id; see `market::encode_member`). The
//! members arrangement is the largest thing the full topology holds (58 MB of
//! 79 MB for 954k live listings), and a merge holds both its inputs and an
//! output sized for both until it ends, so its peak RSS is a multiple of that.
//! Here a member costs its own bytes and a 4-byte offset.
//!
//! Updates reach the arrangement as owned `Member`s (the batcher sorts them
//! as such); batches and merges copy bytes, with no allocation per member.
//! Cursors read a member as a `MemberRef`, a byte slice that orders as the
//! `Member` it came from, so seeks in the arrangement agree with the batcher's
//! sort.

use std::rc::Rc;

use differential_dataflow::batcher::merge::MergeBatcher;
use differential_dataflow::batcher::merge::vec::VecMerger;
use differential_dataflow::trace::implementations::ord_neu::{OrdValBatch, OrdValBuilder};
use differential_dataflow::trace::implementations::spine_fueled::Spine;
use differential_dataflow::trace::implementations::{BatchContainer, ContainerChunker, OffsetList};
use timely::container::PushInto;

use crate::dataflow::market::Member;

/// A member as the arrangement holds it: its bytes (see `encode_member`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct MemberRef<'a>(pub &'a [u8]);

impl std::ops::Deref for MemberRef<'_> {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.0
    }
}

/// The builder compares an incoming owned member with the last one it holds.
impl<'a> PartialEq<&'a Member> for MemberRef<'a> {
    fn eq(&self, other: &&'a Member) -> bool {
        self.0 == other.as_slice()
    }
}

/// Members back to back; `ends[i]` is where member `i` ends.
pub struct MemberBytes {
    ends: OffsetList,
    bytes: Vec<u8>,
}

impl MemberBytes {
    /// What the container holds, in bytes of capacity.
    pub fn heap_bytes(&self) -> usize {
        self.bytes.capacity() + self.ends.smol.capacity() * 4 + self.ends.chonk.capacity() * 8
    }

    fn push_bytes(&mut self, member: &[u8]) {
        self.bytes.extend_from_slice(member);
        self.ends.push(self.bytes.len());
    }
}

/// Bytes reserved per member when only a count is known: a member of the
/// shipped topologies is about 20 bytes.
const BYTES_PER_MEMBER_GUESS: usize = 24;

impl PushInto<Member> for MemberBytes {
    fn push_into(&mut self, member: Member) {
        self.push_bytes(&member);
    }
}

impl BatchContainer for MemberBytes {
    type Owned = Member;
    type ReadItem<'a> = MemberRef<'a>;

    #[inline(always)]
    fn into_owned<'a>(item: MemberRef<'a>) -> Member {
        Member::from_slice(item.0)
    }

    #[inline(always)]
    fn clone_onto<'a>(item: MemberRef<'a>, other: &mut Member) {
        other.clear();
        other.extend_from_slice(item.0);
    }

    fn push_ref(&mut self, item: MemberRef<'_>) {
        self.push_bytes(item.0);
    }

    fn push_own(&mut self, item: &Member) {
        self.push_bytes(item);
    }

    fn clear(&mut self) {
        // keeps the capacity, as differential's own containers do
        self.ends.zero_prefix = 0;
        self.ends.smol.clear();
        self.ends.chonk.clear();
        self.bytes.clear();
    }

    fn with_capacity(size: usize) -> Self {
        Self {
            ends: OffsetList::with_capacity(size),
            bytes: Vec::with_capacity(size * BYTES_PER_MEMBER_GUESS),
        }
    }

    fn merge_capacity(cont1: &Self, cont2: &Self) -> Self {
        Self {
            ends: OffsetList::with_capacity(cont1.len() + cont2.len()),
            bytes: Vec::with_capacity(cont1.bytes.len() + cont2.bytes.len()),
        }
    }

    #[inline(always)]
    fn reborrow<'b, 'a: 'b>(item: MemberRef<'a>) -> MemberRef<'b> {
        item
    }

    #[inline]
    fn index(&self, index: usize) -> MemberRef<'_> {
        let start = if index == 0 {
            0
        } else {
            self.ends.index(index - 1)
        };
        MemberRef(&self.bytes[start..self.ends.index(index)])
    }

    fn len(&self) -> usize {
        self.ends.len()
    }
}

/// Keys (segment, bucket), members, times, diffs, offsets.
pub type MemberLayout = (
    Vec<(u64, u16)>,
    MemberBytes,
    Vec<u64>,
    Vec<isize>,
    OffsetList,
);
type MemberChunk = Vec<(((u64, u16), Member), u64, isize)>;
pub type MemberSpine = Spine<Rc<OrdValBatch<MemberLayout>>>;
pub type MemberBatcher = MergeBatcher<
    ContainerChunker<MemberChunk>,
    VecMerger<((u64, u16), Member), u64, isize>,
    OrdValBuilder<MemberLayout, MemberChunk>,
>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn members_read_back_as_pushed_and_order_as_their_owned_form() {
        let members: Vec<Member> = [
            &b""[..],
            b"a",
            b"ab",
            b"b",
            b"\x00\xff",
            b"longer than a few bytes",
        ]
        .iter()
        .map(|bytes| Member::from_slice(bytes))
        .collect();
        let mut container = MemberBytes::with_capacity(2);
        for member in &members {
            container.push_own(member);
        }
        assert_eq!(container.len(), members.len());
        for (index, member) in members.iter().enumerate() {
            let read = container.index(index);
            assert!(read == member, "member {index}");
            assert_eq!(MemberBytes::into_owned(read), *member);
            for (other_index, other) in members.iter().enumerate() {
                assert_eq!(
                    read.cmp(&container.index(other_index)),
                    member.cmp(other),
                    "{index} against {other_index}"
                );
            }
        }
        let mut merged = MemberBytes::merge_capacity(&container, &container);
        merged.push_ref(container.index(2));
        merged.push_ref(container.index(0));
        assert_eq!(&*merged.index(0), b"ab");
        assert_eq!(&*merged.index(1), b"");
    }
}
