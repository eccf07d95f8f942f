//! Writing webdataset shards: a plain tar whose members are `KEY.EXT`, the members of one sample
//! adjacent. Headers are fixed (mode 0o444 as webdataset's `TarWriter`, mtime, owner) so that the same
//! samples always give byte-identical shards.

use std::io::{self, Write};

/// Fixed member mtime (2020-01-01): reproducible shards, and not 0, which some tools show as "1970".
const MEMBER_MTIME: u64 = 1_577_836_800;

pub struct TarShardWriter<W: Write> {
    builder: tar::Builder<W>,
    n_samples: usize,
}

impl<W: Write> TarShardWriter<W> {
    pub fn new(out: W) -> Self {
        let mut builder = tar::Builder::new(out);
        builder.mode(tar::HeaderMode::Deterministic);
        TarShardWriter {
            builder,
            n_samples: 0,
        }
    }

    /// Appends one sample: `members` are (extension, bytes) pairs written as `key.extension`, in order.
    pub fn write_sample(&mut self, key: &str, members: &[(&str, &[u8])]) -> io::Result<()> {
        for (ext, data) in members {
            let mut header = tar::Header::new_ustar();
            header.set_path(format!("{key}.{ext}"))?;
            header.set_size(data.len() as u64);
            header.set_entry_type(tar::EntryType::Regular);
            header.set_mode(0o444);
            header.set_mtime(MEMBER_MTIME);
            header.set_uid(0);
            header.set_gid(0);
            header.set_cksum();
            self.builder.append(&header, *data)?;
        }
        self.n_samples += 1;
        Ok(())
    }

    pub fn n_samples(&self) -> usize {
        self.n_samples
    }

    /// Writes the end-of-archive blocks and returns the sink.
    pub fn finish(self) -> io::Result<W> {
        self.builder.into_inner()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn members_read_back_in_order_with_fixed_headers() {
        let mut w = TarShardWriter::new(Vec::new());
        w.write_sample("000001", &[("jpg", b"abc"), ("cls", b"3")])
            .unwrap();
        w.write_sample("dir/000002", &[("jpg", b"defg"), ("cls", b"12")])
            .unwrap();
        let bytes = w.finish().unwrap();
        let mut archive = tar::Archive::new(&bytes[..]);
        let mut seen = Vec::new();
        for entry in archive.entries().unwrap() {
            let mut entry = entry.unwrap();
            let mut data = Vec::new();
            io::Read::read_to_end(&mut entry, &mut data).unwrap();
            assert_eq!(entry.header().mode().unwrap(), 0o444);
            seen.push((entry.path().unwrap().to_string_lossy().into_owned(), data));
        }
        let names: Vec<_> = seen.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            [
                "000001.jpg",
                "000001.cls",
                "dir/000002.jpg",
                "dir/000002.cls"
            ]
        );
        assert_eq!(seen[3].1, b"12");
    }
}
