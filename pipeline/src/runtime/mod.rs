//! The runtime of a job, whatever the command: ranks and devices (`launch`), clean stops on signals,
//! libtorch exceptions as errors, progress bars, logging and where the CPU product routing persists.

pub mod launch;
pub mod logging;
pub mod progress;
pub mod routing;
pub mod signals;
pub mod torch_guard;
