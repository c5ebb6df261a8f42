//! A model whose predictions differ from its golden file is refused at load.

use std::path::Path;

use crate::common::*;
use prost::Message;

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
    }
}

#[test]
fn a_tampered_model_fails_its_golden_check_and_the_original_passes() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(listings_topology(), dir.path().join("listings.toml")).unwrap();
    copy_dir(
        &repo().join("topologies/listings/models"),
        &dir.path().join("listings/models"),
    );
    std::fs::create_dir_all(dir.path().join("listings/data")).unwrap();
    std::fs::copy(
        repo().join("topologies/listings/data/us_state_region.csv"),
        dir.path().join("listings/data/us_state_region.csv"),
    )
    .unwrap();
    let config = write_config(dir.path(), &sample_stream(), 1, 256, "");
    let topology = dir.path().join("listings.toml");
    assay::prepare(&topology, Some(&config.path), &[])
        .unwrap_or_else(|e| panic!("the untouched copy should load: {e}"));

    // nudge the output bias of the valuation network: every prediction moves ~2%
    let path = dir.path().join("listings/models/valuation.onnx");
    let mut model =
        tract_onnx::pb::ModelProto::decode(std::fs::read(&path).unwrap().as_slice()).unwrap();
    let graph = model.graph.as_mut().unwrap();
    let last_bias = graph
        .initializer
        .iter_mut()
        .filter(|t| t.name.starts_with('b'))
        .max_by_key(|t| t.name.clone())
        .unwrap();
    let mut value = f32::from_le_bytes(last_bias.raw_data[..4].try_into().unwrap());
    value += 0.02;
    last_bias.raw_data[..4].copy_from_slice(&value.to_le_bytes());
    std::fs::write(&path, model.encode_to_vec()).unwrap();

    match assay::prepare(&topology, Some(&config.path), &[]) {
        Err(assay::PrepareError::Model(assay::model::ModelError::Golden { model, detail })) => {
            assert_eq!(model, "valuation");
            assert!(detail.contains("trainer saw"), "{detail}");
        }
        Err(other) => panic!("expected a golden check failure, got {other}"),
        Ok(_) => panic!("a tampered model was accepted"),
    }
}
