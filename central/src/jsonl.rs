//! The JSONL sink: one append-only file per site, fsync before ack.
//!
//! The file is its own recovery log: on first use the sink reads it to
//! learn the last durable sequence, and cuts away a torn tail left by a
//! crash mid-write (what follows the last whole record was never
//! acknowledged, so the site still has it and sends it again). A damaged
//! line with whole records after it is not a torn write: those records
//! were acknowledged, so it is reported and everything is kept.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use touchline_proto::Record;
use tracing::{error, warn};

use crate::sink::{check_site, plan, Sink, SinkError};

/// Writes `<dir>/<site>.jsonl`, one record per line (`Record::to_json`).
pub struct JsonlSink {
    dir: PathBuf,
    sites: Mutex<HashMap<String, Arc<Mutex<SiteFile>>>>,
}

struct SiteFile {
    file: File,
    last: u64,
    path: PathBuf,
    /// A failed write could not be cut back: the file may end in part of
    /// a line, and the next write must not append after it. Opened again
    /// (which cuts the torn tail) before the next write.
    torn: bool,
}

impl JsonlSink {
    /// Uses `dir`, creating it when missing.
    pub fn open(dir: &Path) -> std::io::Result<JsonlSink> {
        let created = !dir.exists();
        std::fs::create_dir_all(dir)?;
        if created {
            if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
                sync_dir(parent)?;
            }
        }
        Ok(JsonlSink {
            dir: dir.to_path_buf(),
            sites: Mutex::new(HashMap::new()),
        })
    }

    fn site(&self, site: &str) -> Result<Arc<Mutex<SiteFile>>, SinkError> {
        if !valid_site(site) {
            return Err(SinkError::Invalid(format!(
                "site id `{site}` cannot name a file"
            )));
        }
        let mut sites = self.sites.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(f) = sites.get(site) {
            return Ok(f.clone());
        }
        let path = self.dir.join(format!("{site}.jsonl"));
        let opened = recover(&path)
            .map_err(|e| SinkError::Unavailable(format!("cannot open {}: {e}", path.display())))?;
        let f = Arc::new(Mutex::new(opened));
        sites.insert(site.to_string(), f.clone());
        Ok(f)
    }
}

fn valid_site(site: &str) -> bool {
    !site.is_empty()
        && site.len() <= 64
        && site
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
        && !site.starts_with('.')
}

/// Makes a directory's entries durable: a file created in it and
/// fsynced is lost in a power cut until the directory is synced too, and
/// its records were acknowledged by then.
fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Opens the file, drops a torn tail, and finds the last sequence.
fn recover(path: &Path) -> std::io::Result<SiteFile> {
    let created = !path.exists();
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)?;
    if created {
        if let Some(dir) = path.parent() {
            sync_dir(dir)?;
        }
    }
    let mut text = Vec::new();
    file.read_to_end(&mut text)?;
    let scan = scan(&text);
    if !scan.damaged.is_empty() {
        error!(
            file = %path.display(),
            lines = ?scan.damaged,
            "lines that are not records, with records after them: the file was damaged \
             after it was written; keeping every line (the records after them were \
             acknowledged)"
        );
    }
    let (good_end, last) = (scan.good_end, scan.last);
    if good_end < text.len() {
        warn!(
            file = %path.display(),
            bytes = text.len() - good_end,
            "cutting a torn tail left by an interrupted write"
        );
        file.set_len(good_end as u64)?;
        file.sync_all()?;
    }
    file.seek(SeekFrom::End(0))?;
    Ok(SiteFile {
        file,
        last,
        path: path.to_path_buf(),
        torn: false,
    })
}

/// What a read of a site file found.
#[derive(Debug, PartialEq)]
struct Scan {
    /// Highest sequence of a whole record.
    last: u64,
    /// Byte offset just after the last whole record: what follows is a
    /// torn tail.
    good_end: usize,
    /// 1-based numbers of lines before `good_end` that are not records.
    damaged: Vec<usize>,
}

fn scan(text: &[u8]) -> Scan {
    let mut found = Scan {
        last: 0,
        good_end: 0,
        damaged: Vec::new(),
    };
    let mut bad_since_good = Vec::new();
    let mut start = 0;
    let mut line_no = 0;
    while let Some(nl) = text[start..].iter().position(|b| *b == b'\n') {
        line_no += 1;
        let line = &text[start..start + nl];
        match serde_json::from_slice::<serde_json::Value>(line)
            .ok()
            .and_then(|v| v["seq"].as_u64())
        {
            Some(seq) => {
                found.last = found.last.max(seq);
                found.good_end = start + nl + 1;
                found.damaged.append(&mut bad_since_good);
            }
            None => bad_since_good.push(line_no),
        }
        start += nl + 1;
    }
    found
}

impl Sink for JsonlSink {
    async fn last_durable(&self, site: &str) -> Result<u64, SinkError> {
        let f = self.site(site)?;
        let last = f.lock().unwrap_or_else(|p| p.into_inner()).last;
        Ok(last)
    }

    async fn write(
        &self,
        site: &str,
        dropped_through: u64,
        records: &[Record],
    ) -> Result<u64, SinkError> {
        check_site(site, records)?;
        let f = self.site(site)?;
        let records = records.to_vec();
        // File writes and fsync block: keep them off the async workers.
        tokio::task::spawn_blocking(move || {
            let mut f = f.lock().unwrap_or_else(|p| p.into_inner());
            if f.torn {
                let path = f.path.clone();
                *f = recover(&path).map_err(|e| {
                    SinkError::Unavailable(format!("cannot reopen {}: {e}", path.display()))
                })?;
            }
            let (keep, next) = plan(f.last, dropped_through, &records);
            if !keep.is_empty() {
                let mut buf = Vec::with_capacity(keep.len() * 256);
                for i in keep {
                    serde_json::to_writer(&mut buf, &records[i].to_json())
                        .map_err(|e| SinkError::Unavailable(e.to_string()))?;
                    buf.push(b'\n');
                }
                let before = f.file.stream_position().map_err(|e| {
                    SinkError::Unavailable(format!("cannot locate the end of the file: {e}"))
                })?;
                let written = f.file.write_all(&buf).and_then(|()| f.file.sync_data());
                if let Err(e) = written {
                    // Cut a partial write so the next one starts on a line
                    // boundary; if even that fails, the file is opened
                    // again (cutting the torn tail) before the next write,
                    // which must not append after half a line.
                    let cut = f
                        .file
                        .set_len(before)
                        .and_then(|()| f.file.seek(SeekFrom::Start(before)));
                    if cut.is_err() {
                        f.torn = true;
                    }
                    return Err(SinkError::Unavailable(format!("write failed: {e}")));
                }
            }
            f.last = next;
            Ok(next)
        })
        .await
        .map_err(|e| SinkError::Unavailable(format!("writer task failed: {e}")))?
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sink::test_record as rec;

    fn seqs(path: &Path) -> Vec<u64> {
        std::fs::read_to_string(path)
            .unwrap()
            .lines()
            .map(|l| {
                serde_json::from_str::<serde_json::Value>(l).unwrap()["seq"]
                    .as_u64()
                    .unwrap()
            })
            .collect()
    }

    #[test]
    fn a_torn_tail_is_cut_and_a_damaged_middle_line_keeps_what_follows() {
        let good = |seq: u64| format!("{{\"seq\":{seq},\"kind\":\"x\"}}\n");
        // A torn last line, with and without its newline.
        let text = format!("{}{}{{\"seq\":3,\"ki", good(1), good(2));
        let found = scan(text.as_bytes());
        assert_eq!((found.last, found.damaged.len()), (2, 0));
        assert_eq!(found.good_end, good(1).len() + good(2).len());
        let text = format!("{}garbage\n", good(1));
        assert_eq!(scan(text.as_bytes()).good_end, good(1).len());
        // Damage in the middle: the records after it count and stay.
        let text = format!("{}not json\n{}{}", good(1), good(2), good(3));
        let found = scan(text.as_bytes());
        assert_eq!(found.last, 3);
        assert_eq!(found.good_end, text.len());
        assert_eq!(found.damaged, vec![2]);
    }

    #[tokio::test]
    async fn opening_a_damaged_file_keeps_every_acknowledged_record() {
        let dir = tempfile::tempdir().unwrap();
        let central = dir.path().join("central");
        let sink = JsonlSink::open(&central).unwrap();
        assert_eq!(
            sink.write("s", 0, &[rec(1), rec(2), rec(3)]).await.unwrap(),
            3
        );
        drop(sink);
        let path = central.join("s.jsonl");
        let text = std::fs::read_to_string(&path).unwrap();
        let mut lines: Vec<&str> = text.lines().collect();
        lines[1] = "{\"seq\":2,\"kind\":\"achievem";
        std::fs::write(&path, lines.join("\n") + "\n").unwrap();

        let again = JsonlSink::open(&central).unwrap();
        assert_eq!(again.last_durable("s").await.unwrap(), 3);
        assert_eq!(again.write("s", 0, &[rec(4)]).await.unwrap(), 4);
        let kept = std::fs::read_to_string(&path).unwrap();
        assert_eq!(kept.lines().count(), 4, "{kept}");
        assert!(kept.lines().last().unwrap().contains("\"seq\":4"));
    }

    /// After a write that failed and could not be cut back, the next
    /// write reopens the file, cutting the half line, instead of
    /// appending acknowledged records after it (which the next start
    /// would cut away with it).
    #[tokio::test]
    async fn a_write_after_a_torn_one_starts_on_a_line_of_its_own() {
        let dir = tempfile::tempdir().unwrap();
        let sink = JsonlSink::open(&dir.path().join("central")).unwrap();
        assert_eq!(sink.write("s", 0, &[rec(1), rec(2)]).await.unwrap(), 2);
        let path = dir.path().join("central/s.jsonl");
        {
            let f = sink.site("s").unwrap();
            let mut f = f.lock().unwrap();
            f.file.write_all(br#"{"seq":3,"si"#).unwrap();
            f.torn = true;
        }
        assert_eq!(sink.write("s", 0, &[rec(3), rec(4)]).await.unwrap(), 4);
        assert_eq!(seqs(&path), vec![1, 2, 3, 4]);
        // A fresh start reads every acknowledged record back.
        let again = JsonlSink::open(&dir.path().join("central")).unwrap();
        assert_eq!(again.last_durable("s").await.unwrap(), 4);
    }
}
