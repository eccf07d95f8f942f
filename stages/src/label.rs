//! Class labels from a sample's members: `.cls` (ASCII decimal, as webdataset writes `str(int)`;
//! surrounding whitespace tolerated as `int()` does) or one integer field of a `.json` member.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LabelSource {
    Cls,
    Json,
    /// Unlabelled data: every sample gets no label and none is required.
    None,
}

#[derive(Debug, PartialEq, Eq)]
pub enum LabelError {
    Missing,
    Bad(String),
}

/// The label of a sample, given a lookup of its members by extension.
pub fn read_label<'a>(
    source: LabelSource,
    json_field: &str,
    member: impl Fn(&str) -> Option<&'a [u8]>,
) -> Result<Option<u32>, LabelError> {
    match source {
        LabelSource::None => Ok(None),
        LabelSource::Cls => {
            let bytes = member("cls").ok_or(LabelError::Missing)?;
            let text = std::str::from_utf8(bytes)
                .map_err(|_| LabelError::Bad("cls is not ASCII".into()))?;
            text.trim().parse::<u32>().map(Some).map_err(|_| {
                LabelError::Bad(format!("cls {:?} is not a class index", truncate(text)))
            })
        }
        LabelSource::Json => {
            let bytes = member("json").ok_or(LabelError::Missing)?;
            let value: serde_json::Value = serde_json::from_slice(bytes)
                .map_err(|e| LabelError::Bad(format!("json member: {e}")))?;
            let field = value
                .get(json_field)
                .ok_or_else(|| LabelError::Bad(format!("json has no field `{json_field}`")))?;
            field
                .as_u64()
                .and_then(|v| u32::try_from(v).ok())
                .map(Some)
                .ok_or_else(|| {
                    LabelError::Bad(format!(
                        "json field `{json_field}` = {} is not a class index",
                        truncate(&field.to_string())
                    ))
                })
        }
    }
}

fn truncate(s: &str) -> String {
    s.chars().take(40).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cls(bytes: &'static [u8]) -> Result<Option<u32>, LabelError> {
        read_label(LabelSource::Cls, "label", |e| (e == "cls").then_some(bytes))
    }

    #[test]
    fn cls_is_ascii_integer_with_whitespace_tolerated() {
        assert_eq!(cls(b"207"), Ok(Some(207)));
        assert_eq!(cls(b" 3\n"), Ok(Some(3)));
        assert!(matches!(cls(b"not-a-number"), Err(LabelError::Bad(_))));
        assert!(matches!(cls(b"-1"), Err(LabelError::Bad(_))));
        assert_eq!(
            read_label(LabelSource::Cls, "label", |_| None),
            Err(LabelError::Missing)
        );
    }

    #[test]
    fn json_field_is_configurable() {
        let json: &[u8] = br#"{"label": 5, "class_id": 7, "name": "x"}"#;
        let get = |e: &str| (e == "json").then_some(json);
        assert_eq!(read_label(LabelSource::Json, "label", get), Ok(Some(5)));
        assert_eq!(read_label(LabelSource::Json, "class_id", get), Ok(Some(7)));
        assert!(matches!(
            read_label(LabelSource::Json, "name", get),
            Err(LabelError::Bad(_))
        ));
        assert!(matches!(
            read_label(LabelSource::Json, "nope", get),
            Err(LabelError::Bad(_))
        ));
        assert_eq!(read_label(LabelSource::None, "label", |_| None), Ok(None));
    }
}
