//! The RocksDB store: per-listing state and source positions, written together.
//!
//! No stage touches `rocksdb::DB` directly. Reads are batched (`get_many`, one
//! `multi_get` per message); writes happen only in [`Store::checkpoint`], one
//! `WriteBatch` holding every state change of the checkpointed epochs *and* the
//! source positions that produced them, so state is never ahead of positions.
//!
//! # Encoding
//! Keys: `[1][partition u32 BE][listing id bytes]` in column family `listings`.
//! Values: format byte `1`, then the fields of [`ListingState`] little-endian
//! (see `encode`). The topology's field list is stored under `meta/schema`;
//! opening state written for another field list is refused with a message,
//! because field values are stored by position.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rocksdb::{ColumnFamilyDescriptor, DB, Options, WriteBatch};

use crate::record::Value;

const LISTINGS: &str = "listings";
const META: &str = "meta";
const KEY_FORMAT: u8 = 1;
/// 2 added the change gate's memory (market view, emitted hash, revision);
/// 3 the model outputs of the last own evaluation. Formats 1 and 2 are still
/// read, as a listing that was never gated or never scored.
const VALUE_FORMAT: u8 = 3;

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("cannot open the state store at {path}: {detail}")]
    Open { path: PathBuf, detail: String },
    #[error(
        "state store at {path} was written for different input fields\n  stored:   {stored}\n  topology: {current}\n  hint: use a new state directory, or run with --from-scratch to discard the old state"
    )]
    SchemaMismatch {
        path: PathBuf,
        stored: String,
        current: String,
    },
    #[error("state store I/O failed: {0}")]
    Io(String),
    #[error("state store holds a value it cannot read (format {format}): {detail}")]
    Corrupt { format: u8, detail: String },
}

impl From<rocksdb::Error> for StateError {
    fn from(error: rocksdb::Error) -> Self {
        StateError::Io(error.to_string())
    }
}

/// What the engine remembers about one listing.
#[derive(Debug, Clone, PartialEq)]
pub struct ListingState {
    /// Highest version applied (also kept after a delete, to recognize stale events).
    pub version: u64,
    /// A tombstone: the listing was removed; `fields` is empty.
    pub deleted: bool,
    pub first_seen: i64,
    pub last_event_time: i64,
    pub initial_price: Option<f64>,
    pub price_change_count: u32,
    pub last_price_change: Option<i64>,
    /// Current values of the topology's input fields, by field index.
    pub fields: Vec<Option<Value>>,
    /// The rounded market statistics the listing's last evaluation saw, all
    /// aggregates flattened (NaN: the listing was in no segment).
    pub market: Vec<f64>,
    /// Hash of the output fields of the last document emitted (0: none yet).
    pub emitted_hash: u64,
    /// Documents emitted because the market moved since the listing's own
    /// last event: the low bits of the document version.
    pub revision: u32,
    /// Every model's outputs (flattened, topology order) at the listing's
    /// last own evaluation, valid while `scores_stamp` is
    /// `Plan::scoring_stamp` of the current scoring fingerprint and this
    /// state's version (0: none kept).
    pub scores: smallvec::SmallVec<[f32; 4]>,
    pub scores_stamp: u64,
}

/// A source position as checkpointed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CheckpointedPosition {
    /// Next record to read (line number or Kafka offset).
    pub next_offset: u64,
    /// Next byte to read, for files.
    pub next_byte: u64,
}

#[derive(Clone)]
pub struct Store {
    db: Arc<DB>,
    path: PathBuf,
}

/// Memory knobs, from the config.
#[derive(Debug, Clone, Copy)]
pub struct StoreTuning {
    /// Shared block cache: hot listings are read from memory.
    pub block_cache_bytes: usize,
    /// Memtable size: larger absorbs more writes per flush, costs memory.
    pub write_buffer_bytes: usize,
}

impl Store {
    pub fn open(
        path: &Path,
        schema_fingerprint: &str,
        tuning: StoreTuning,
    ) -> Result<Store, StateError> {
        let open_error = |detail: String| StateError::Open {
            path: path.to_path_buf(),
            detail,
        };
        std::fs::create_dir_all(path).map_err(|e| open_error(e.to_string()))?;
        let mut options = Options::default();
        options.create_if_missing(true);
        options.create_missing_column_families(true);
        let cache = rocksdb::Cache::new_lru_cache(tuning.block_cache_bytes);
        let mut table = rocksdb::BlockBasedOptions::default();
        table.set_block_cache(&cache);
        table.set_bloom_filter(10.0, false);
        let mut listings = Options::default();
        listings.set_block_based_table_factory(&table);
        listings.set_write_buffer_size(tuning.write_buffer_bytes);
        listings.set_compression_type(rocksdb::DBCompressionType::Lz4);
        // most reads of a new listing miss: a memtable bloom filter answers
        // them without walking the skip list
        listings.set_memtable_whole_key_filtering(true);
        listings.set_memtable_prefix_bloom_ratio(0.1);
        let descriptors = vec![
            ColumnFamilyDescriptor::new(LISTINGS, listings),
            ColumnFamilyDescriptor::new(META, Options::default()),
        ];
        let db = DB::open_cf_descriptors(&options, path, descriptors)
            .map_err(|e| open_error(e.to_string()))?;
        let store = Store {
            db: Arc::new(db),
            path: path.to_path_buf(),
        };
        let meta = store.db.cf_handle(META).expect("meta column family exists");
        match store.db.get_cf(&meta, b"schema")? {
            Some(stored) => {
                let stored = String::from_utf8_lossy(&stored).to_string();
                if stored != schema_fingerprint {
                    return Err(StateError::SchemaMismatch {
                        path: path.to_path_buf(),
                        stored,
                        current: schema_fingerprint.to_string(),
                    });
                }
            }
            None => store
                .db
                .put_cf(&meta, b"schema", schema_fingerprint.as_bytes())?,
        }
        Ok(store)
    }

    /// Counts the runs that resumed from this store and returns the new count,
    /// written (synced) before any output. Sources whose replay may cut epochs
    /// elsewhere (Kafka) put it into document versions, so every document of
    /// this run outranks anything an earlier, crashed run wrote past its last
    /// checkpoint (see `dataflow::evaluate`).
    pub fn next_incarnation(&self) -> Result<u32, StateError> {
        let meta = self.db.cf_handle(META).expect("meta column family exists");
        let current = match self.db.get_cf(&meta, b"incarnation")? {
            Some(bytes) if bytes.len() == 4 => u32::from_le_bytes(bytes[..4].try_into().unwrap()),
            _ => 0,
        };
        let next = current.saturating_add(1);
        let mut options = rocksdb::WriteOptions::default();
        options.set_sync(true);
        self.db
            .put_cf_opt(&meta, b"incarnation", next.to_le_bytes(), &options)?;
        Ok(next)
    }

    /// A value of the store's own (`meta/<name>`).
    pub fn get_meta(&self, name: &str) -> Result<Option<Vec<u8>>, StateError> {
        let meta = self.db.cf_handle(META).expect("meta column family exists");
        Ok(self.db.get_cf(&meta, name.as_bytes())?)
    }

    /// Sets `meta/<name>`, synced.
    pub fn put_meta(&self, name: &str, value: &[u8]) -> Result<(), StateError> {
        let meta = self.db.cf_handle(META).expect("meta column family exists");
        let mut options = rocksdb::WriteOptions::default();
        options.set_sync(true);
        self.db
            .put_cf_opt(&meta, name.as_bytes(), value, &options)?;
        Ok(())
    }

    /// Writes the memtables to table files, so that the next start does not
    /// replay the write-ahead log (at a million listings, most of a restart).
    pub fn flush(&self) -> Result<(), StateError> {
        let listings = self
            .db
            .cf_handle(LISTINGS)
            .expect("listings column family exists");
        let meta = self.db.cf_handle(META).expect("meta column family exists");
        self.db
            .flush_cfs_opt(&[&listings, &meta], &rocksdb::FlushOptions::default())?;
        Ok(())
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn state_key(partition: u32, listing_id: &str) -> Vec<u8> {
        let mut key = Vec::with_capacity(5 + listing_id.len());
        Self::write_state_key(&mut key, partition, listing_id);
        key
    }

    /// `state_key`, appended to a buffer the caller reuses.
    pub fn write_state_key(out: &mut Vec<u8>, partition: u32, listing_id: &str) {
        out.push(KEY_FORMAT);
        out.extend_from_slice(&partition.to_be_bytes());
        out.extend_from_slice(listing_id.as_bytes());
    }

    /// Reads many listings at once (one `multi_get`).
    pub fn get_many<K: AsRef<[u8]>>(
        &self,
        keys: &[K],
    ) -> Result<Vec<Option<ListingState>>, StateError> {
        let cf = self
            .db
            .cf_handle(LISTINGS)
            .expect("listings column family exists");
        // callers mostly ask in key order; telling RocksDB so spares its sort
        let sorted = keys.is_sorted_by(|a, b| a.as_ref() <= b.as_ref());
        let results = self.db.batched_multi_get_cf(&cf, keys.iter(), sorted);
        results
            .into_iter()
            .map(|result| match result? {
                Some(bytes) => decode(&bytes).map(Some),
                None => Ok(None),
            })
            .collect()
    }

    /// Source positions checkpointed for a binding, by partition.
    pub fn positions(
        &self,
        binding: &str,
    ) -> Result<HashMap<u32, CheckpointedPosition>, StateError> {
        let meta = self.db.cf_handle(META).expect("meta column family exists");
        let prefix = format!("position/{binding}/");
        let mut positions = HashMap::new();
        for item in self.db.prefix_iterator_cf(&meta, prefix.as_bytes()) {
            let (key, value) = item?;
            if !key.starts_with(prefix.as_bytes()) {
                break;
            }
            let partition: u32 = std::str::from_utf8(&key[prefix.len()..])
                .ok()
                .and_then(|p| p.parse().ok())
                .ok_or_else(|| StateError::Corrupt {
                    format: 0,
                    detail: format!("position key {:?}", String::from_utf8_lossy(&key)),
                })?;
            if value.len() != 16 {
                return Err(StateError::Corrupt {
                    format: 0,
                    detail: "position value is not 16 bytes".into(),
                });
            }
            positions.insert(
                partition,
                CheckpointedPosition {
                    next_offset: u64::from_le_bytes(value[..8].try_into().unwrap()),
                    next_byte: u64::from_le_bytes(value[8..].try_into().unwrap()),
                },
            );
        }
        Ok(positions)
    }

    /// Writes state changes and the positions that produced them in one batch.
    /// `None` deletes the key.
    /// `deferred`: the market re-evaluations waiting in each partition
    /// (`DeferredEvaluations::encode`; empty: none, the stored value goes).
    pub fn checkpoint<'a>(
        &self,
        changes: impl Iterator<Item = (&'a [u8], Option<&'a ListingState>)>,
        binding: &str,
        positions: &[(u32, CheckpointedPosition)],
        deferred: &[(u32, Vec<u8>)],
    ) -> Result<usize, StateError> {
        let listings = self
            .db
            .cf_handle(LISTINGS)
            .expect("listings column family exists");
        let meta = self.db.cf_handle(META).expect("meta column family exists");
        let mut batch = WriteBatch::default();
        let mut buffer = Vec::with_capacity(256);
        let mut count = 0;
        for (key, state) in changes {
            match state {
                Some(state) => {
                    buffer.clear();
                    encode(state, &mut buffer);
                    batch.put_cf(&listings, key, &buffer);
                }
                None => batch.delete_cf(&listings, key),
            }
            count += 1;
        }
        for (partition, position) in positions {
            let mut value = [0u8; 16];
            value[..8].copy_from_slice(&position.next_offset.to_le_bytes());
            value[8..].copy_from_slice(&position.next_byte.to_le_bytes());
            batch.put_cf(
                &meta,
                format!("position/{binding}/{partition}").as_bytes(),
                value,
            );
        }
        for (partition, waiting) in deferred {
            let key = Self::deferred_key(binding, *partition);
            if waiting.is_empty() {
                batch.delete_cf(&meta, key.as_bytes());
            } else {
                batch.put_cf(&meta, key.as_bytes(), waiting);
            }
        }
        self.db.write(batch)?;
        Ok(count)
    }

    fn deferred_key(binding: &str, partition: u32) -> String {
        format!("deferred/{binding}/{partition}")
    }

    /// The market re-evaluations the last checkpoint left waiting in a
    /// partition, as `checkpoint` stored them (`None`: none).
    pub fn deferred_evaluations(
        &self,
        binding: &str,
        partition: u32,
    ) -> Result<Option<Vec<u8>>, StateError> {
        self.get_meta(&Self::deferred_key(binding, partition))
    }

    /// Up to `limit` listings of `partition` (live and removed), in key
    /// order, from the key `from` on (`None`: the partition's first). Returns
    /// the key to continue from, or `None` when the partition is done: a
    /// caller can scan a large store in steps without holding an iterator.
    pub fn scan_partition(
        &self,
        partition: u32,
        from: Option<&[u8]>,
        limit: usize,
        mut visit: impl FnMut(&str, ListingState),
    ) -> Result<Option<Vec<u8>>, StateError> {
        let cf = self
            .db
            .cf_handle(LISTINGS)
            .expect("listings column family exists");
        let prefix = Self::state_key(partition, "");
        let start = from.unwrap_or(&prefix);
        let iterator = self.db.iterator_cf(
            &cf,
            rocksdb::IteratorMode::From(start, rocksdb::Direction::Forward),
        );
        for (visited, item) in iterator.enumerate() {
            let (key, value) = item?;
            if !key.starts_with(&prefix) {
                return Ok(None);
            }
            if visited == limit {
                return Ok(Some(key.to_vec()));
            }
            visit(&String::from_utf8_lossy(&key[5..]), decode(&value)?);
        }
        Ok(None)
    }
}

fn put_opt_f64(out: &mut Vec<u8>, value: Option<f64>) {
    match value {
        Some(v) => {
            out.push(1);
            out.extend_from_slice(&v.to_le_bytes());
        }
        None => out.push(0),
    }
}

pub fn encode(state: &ListingState, out: &mut Vec<u8>) {
    out.push(VALUE_FORMAT);
    out.extend_from_slice(&state.version.to_le_bytes());
    out.push(state.deleted as u8);
    out.extend_from_slice(&state.first_seen.to_le_bytes());
    out.extend_from_slice(&state.last_event_time.to_le_bytes());
    put_opt_f64(out, state.initial_price);
    out.extend_from_slice(&state.price_change_count.to_le_bytes());
    match state.last_price_change {
        Some(t) => {
            out.push(1);
            out.extend_from_slice(&t.to_le_bytes());
        }
        None => out.push(0),
    }
    out.extend_from_slice(&state.emitted_hash.to_le_bytes());
    out.extend_from_slice(&state.revision.to_le_bytes());
    out.extend_from_slice(&(state.market.len() as u16).to_le_bytes());
    for value in &state.market {
        out.extend_from_slice(&value.to_le_bytes());
    }
    // more outputs than a count byte holds are not kept (scored again instead)
    let (stamp, scores) = match u8::try_from(state.scores.len()) {
        Ok(_) => (state.scores_stamp, state.scores.as_slice()),
        Err(_) => (0, &[][..]),
    };
    out.extend_from_slice(&stamp.to_le_bytes());
    out.push(scores.len() as u8);
    for score in scores {
        out.extend_from_slice(&score.to_le_bytes());
    }
    out.extend_from_slice(&(state.fields.len() as u16).to_le_bytes());
    for field in &state.fields {
        match field {
            None => out.push(0),
            Some(Value::Int(i)) => {
                out.push(1);
                out.extend_from_slice(&i.to_le_bytes());
            }
            Some(Value::Num(n)) => {
                out.push(2);
                out.extend_from_slice(&n.to_le_bytes());
            }
            Some(Value::Str(s)) => {
                out.push(3);
                out.extend_from_slice(&(s.len() as u32).to_le_bytes());
                out.extend_from_slice(s.as_bytes());
            }
        }
    }
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], StateError> {
        let slice = self
            .bytes
            .get(self.at..self.at + n)
            .ok_or_else(|| StateError::Corrupt {
                format: VALUE_FORMAT,
                detail: "value is truncated".into(),
            })?;
        self.at += n;
        Ok(slice)
    }
    fn u8(&mut self) -> Result<u8, StateError> {
        Ok(self.take(1)?[0])
    }
    fn u64(&mut self) -> Result<u64, StateError> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().unwrap()))
    }
    fn i64(&mut self) -> Result<i64, StateError> {
        Ok(i64::from_le_bytes(self.take(8)?.try_into().unwrap()))
    }
    fn f64(&mut self) -> Result<f64, StateError> {
        Ok(f64::from_le_bytes(self.take(8)?.try_into().unwrap()))
    }
}

pub fn decode(bytes: &[u8]) -> Result<ListingState, StateError> {
    let mut r = Reader { bytes, at: 0 };
    let format = r.u8()?;
    if !(1..=VALUE_FORMAT).contains(&format) {
        return Err(StateError::Corrupt {
            format,
            detail: format!("this build reads formats 1 to {VALUE_FORMAT}"),
        });
    }
    let version = r.u64()?;
    let deleted = r.u8()? != 0;
    let first_seen = r.i64()?;
    let last_event_time = r.i64()?;
    let initial_price = if r.u8()? == 1 { Some(r.f64()?) } else { None };
    let price_change_count = u32::from_le_bytes(r.take(4)?.try_into().unwrap());
    let last_price_change = if r.u8()? == 1 { Some(r.i64()?) } else { None };
    let (mut emitted_hash, mut revision, mut market) = (0, 0, Vec::new());
    if format >= 2 {
        emitted_hash = r.u64()?;
        revision = u32::from_le_bytes(r.take(4)?.try_into().unwrap());
        let count = u16::from_le_bytes(r.take(2)?.try_into().unwrap()) as usize;
        market = (0..count).map(|_| r.f64()).collect::<Result<_, _>>()?;
    }
    let (mut scores_stamp, mut scores) = (0, smallvec::SmallVec::new());
    if format >= 3 {
        scores_stamp = r.u64()?;
        let count = r.u8()? as usize;
        scores = (0..count)
            .map(|_| Ok(f32::from_le_bytes(r.take(4)?.try_into().unwrap())))
            .collect::<Result<_, StateError>>()?;
    }
    let count = u16::from_le_bytes(r.take(2)?.try_into().unwrap()) as usize;
    let mut fields = Vec::with_capacity(count);
    for _ in 0..count {
        fields.push(match r.u8()? {
            0 => None,
            1 => Some(Value::Int(r.i64()?)),
            2 => Some(Value::Num(r.f64()?)),
            3 => {
                let len = u32::from_le_bytes(r.take(4)?.try_into().unwrap()) as usize;
                let text = std::str::from_utf8(r.take(len)?).map_err(|e| StateError::Corrupt {
                    format,
                    detail: e.to_string(),
                })?;
                Some(Value::Str(smol_str::SmolStr::new(text)))
            }
            tag => {
                return Err(StateError::Corrupt {
                    format,
                    detail: format!("unknown value tag {tag}"),
                });
            }
        });
    }
    Ok(ListingState {
        version,
        deleted,
        first_seen,
        last_event_time,
        initial_price,
        price_change_count,
        last_price_change,
        fields,
        market,
        emitted_hash,
        revision,
        scores,
        scores_stamp,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(seed: u64) -> ListingState {
        ListingState {
            version: seed,
            deleted: seed.is_multiple_of(3),
            first_seen: -(seed as i64) * 7,
            last_event_time: seed as i64 * 11,
            initial_price: if seed.is_multiple_of(2) {
                Some(seed as f64 * 1.5)
            } else {
                None
            },
            price_change_count: (seed % 5) as u32,
            last_price_change: if seed.is_multiple_of(4) {
                Some(seed as i64)
            } else {
                None
            },
            fields: (0..(seed % 6))
                .map(|i| match (seed + i) % 4 {
                    0 => None,
                    1 => Some(Value::Int(i as i64 - 3)),
                    2 => Some(Value::Num(i as f64 / 3.0)),
                    _ => Some(Value::Str(format!("v{i}é").into())),
                })
                .collect(),
            market: (0..(seed % 3)).map(|i| i as f64 * 100.5).collect(),
            emitted_hash: seed * 7919,
            revision: (seed % 11) as u32,
            scores: (0..(seed % 4)).map(|i| i as f32 * 0.25 - 1.0).collect(),
            scores_stamp: seed * 31,
        }
    }

    #[test]
    fn encoding_round_trips() {
        for seed in 0..200 {
            let state = sample(seed);
            let mut bytes = Vec::new();
            encode(&state, &mut bytes);
            assert_eq!(decode(&bytes).expect("decodes"), state, "seed {seed}");
        }
    }

    #[test]
    fn truncated_and_foreign_values_are_refused() {
        let mut bytes = Vec::new();
        encode(&sample(5), &mut bytes);
        assert!(decode(&bytes[..bytes.len() - 1]).is_err());
        bytes[0] = 9;
        assert!(matches!(
            decode(&bytes),
            Err(StateError::Corrupt { format: 9, .. })
        ));
    }

    /// Small caches: the tests hold a handful of listings.
    const SMALL: StoreTuning = StoreTuning {
        block_cache_bytes: 1 << 20,
        write_buffer_bytes: 1 << 20,
    };

    #[test]
    fn checkpoint_writes_state_and_positions_together_and_schema_is_checked() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), "a:String", SMALL).unwrap();
        let key = Store::state_key(3, "cl-1");
        let state = sample(4);
        store
            .checkpoint(
                [(key.as_slice(), Some(&state))].into_iter(),
                "in",
                &[(
                    3,
                    CheckpointedPosition {
                        next_offset: 10,
                        next_byte: 99,
                    },
                )],
                &[(3, b"waiting".to_vec()), (4, Vec::new())],
            )
            .unwrap();
        assert_eq!(
            store.deferred_evaluations("in", 3).unwrap().as_deref(),
            Some(&b"waiting"[..])
        );
        assert_eq!(store.deferred_evaluations("in", 4).unwrap(), None);
        store
            .checkpoint(std::iter::empty(), "in", &[], &[(3, Vec::new())])
            .unwrap();
        assert_eq!(
            store.deferred_evaluations("in", 3).unwrap(),
            None,
            "emptied"
        );
        assert_eq!(
            store
                .get_many(&[key.clone(), Store::state_key(3, "none")])
                .unwrap(),
            vec![Some(state), None]
        );
        assert_eq!(
            store.positions("in").unwrap()[&3],
            CheckpointedPosition {
                next_offset: 10,
                next_byte: 99
            }
        );
        assert!(store.positions("other").unwrap().is_empty());
        drop(store);
        match Store::open(dir.path(), "b:String", SMALL) {
            Err(StateError::SchemaMismatch { .. }) => {}
            other => panic!("expected a schema mismatch, got {:?}", other.err()),
        }
    }

    #[test]
    fn a_partition_scanned_in_steps_visits_what_one_scan_visits() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), "a:String", SMALL).unwrap();
        // partitions 0..4 with 0, 1, 7 and 10 listings: neighbours must not leak in
        let mut written: Vec<(u32, String, ListingState)> = Vec::new();
        for (partition, count) in [(0u32, 0usize), (1, 1), (2, 7), (3, 10)] {
            for n in 0..count {
                written.push((partition, format!("l-{n}"), sample(n as u64)));
            }
        }
        let keys: Vec<Vec<u8>> = written
            .iter()
            .map(|(p, id, _)| Store::state_key(*p, id))
            .collect();
        store
            .checkpoint(
                keys.iter()
                    .zip(&written)
                    .map(|(k, (_, _, state))| (k.as_slice(), Some(state))),
                "in",
                &[],
                &[],
            )
            .unwrap();
        for partition in 0..4u32 {
            let mut whole = Vec::new();
            let rest = store
                .scan_partition(partition, None, usize::MAX, |id, state| {
                    whole.push((id.to_string(), state))
                })
                .unwrap();
            assert!(rest.is_none());
            let mut expected: Vec<(String, ListingState)> = written
                .iter()
                .filter(|(p, _, _)| *p == partition)
                .map(|(_, id, state)| (id.clone(), state.clone()))
                .collect();
            expected.sort_by(|a, b| a.0.cmp(&b.0));
            assert_eq!(whole, expected, "partition {partition}");
            for limit in [1, 3, 7] {
                let (mut stepped, mut from, mut steps) = (Vec::new(), None, 0);
                loop {
                    steps += 1;
                    let next = store
                        .scan_partition(partition, from.as_deref(), limit, |id, state| {
                            stepped.push((id.to_string(), state))
                        })
                        .unwrap();
                    match next {
                        Some(key) => from = Some(key),
                        None => break,
                    }
                }
                assert_eq!(
                    stepped, expected,
                    "partition {partition} in steps of {limit}"
                );
                assert_eq!(
                    steps,
                    expected.len().div_ceil(limit).max(1),
                    "partition {partition} in steps of {limit}"
                );
            }
        }
    }
}
