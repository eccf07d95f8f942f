use std::path::PathBuf;

/// Errors of the data stages. Every variant names where it happened: the file, and for samples the
/// shard and key, so a bad member among 1.28 M can be found.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("shard {shard}: key {key}: {message}")]
    Sample {
        shard: String,
        key: String,
        message: String,
    },
    #[error("jpeg encoding for key {key}: {source}")]
    JpegEncode {
        key: String,
        #[source]
        source: turbojpeg::Error,
    },
    #[error("{0}")]
    Invalid(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}
