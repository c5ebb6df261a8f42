//! assay: a stream-processing engine that enriches marketplace listings for
//! search. See ARCHITECTURE.md for the bird's-eye view and the code map.

pub mod bench;
pub mod config;
pub mod connectors;
pub mod dataflow;
pub mod diagnostics;
pub mod features;
pub mod hash;
pub mod model;
pub mod observe;
pub mod record;
pub mod scan;
pub mod state;
pub mod topology;

use std::path::Path;
use std::sync::Arc;

use diagnostics::Diagnostics;

/// Everything validated and loaded, ready to run: the "hiargs" of ripgrep.
pub struct Prepared {
    pub plan: Arc<topology::Plan>,
    pub config: config::EnvConfig,
    pub models: Arc<Vec<model::LoadedModel>>,
}

#[derive(Debug, thiserror::Error)]
pub enum PrepareError {
    #[error("{0}")]
    Invalid(Diagnostics),
    #[error(transparent)]
    Model(#[from] model::ModelError),
}

/// Validates the topology and the config together (every error at once), then
/// loads and golden-checks the models. Nothing runs before this succeeds.
pub fn prepare(
    topology_path: &Path,
    config_path: Option<&Path>,
    env: &[(String, String)],
) -> Result<Prepared, PrepareError> {
    let plan = topology::load(topology_path);
    let config = config::load(config_path, env, plan.as_ref().ok());
    let (plan, config) = match (plan, config) {
        (Ok(plan), Ok(config)) => (plan, config),
        (plan, config) => {
            let mut all = Diagnostics::default();
            if let Err(e) = plan {
                all.extend(e);
            }
            if let Err(e) = config {
                all.extend(e);
            }
            return Err(PrepareError::Invalid(all));
        }
    };
    let models = model::load_all(&plan)?;
    Ok(Prepared {
        plan: Arc::new(plan),
        config,
        models: Arc::new(models),
    })
}
