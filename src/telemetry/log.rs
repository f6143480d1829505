//! The connection log writer: a dedicated thread that drains a bounded queue of records into
//! stdout or a file, one JSON line each. The data path only ever `try_send`s into the queue.

use std::fs::OpenOptions;
use std::io::{BufWriter, Write};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::thread::JoinHandle;

use super::ConnectionRecord;
use crate::config::LogDestination;

#[derive(Debug, thiserror::Error)]
pub enum LogWriterError {
    #[error("cannot open log file {path}: {source}")]
    Open {
        path: String,
        source: std::io::Error,
    },
}

/// What travels to the writer thread.
#[expect(
    clippy::large_enum_variant,
    reason = "records travel inline: boxing would allocate once per connection"
)]
pub(super) enum LogItem {
    Record(ConnectionRecord),
    /// Write what is queued before this, then exit.
    Stop,
}

/// Owns the writer thread. Dropping every [`super::Telemetry`] and this writer ends it.
pub struct LogWriter {
    tx: Option<SyncSender<LogItem>>,
    thread: Option<JoinHandle<()>>,
}

impl LogWriter {
    pub fn start(destination: &LogDestination, queue: usize) -> Result<Self, LogWriterError> {
        let sink: Box<dyn Write + Send> = match destination {
            LogDestination::Stdout => Box::new(std::io::stdout()),
            LogDestination::File(path) => Box::new(
                OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .map_err(|source| LogWriterError::Open {
                        path: path.display().to_string(),
                        source,
                    })?,
            ),
        };
        let (tx, rx) = sync_channel(queue);
        let thread = std::thread::Builder::new()
            .name("portcullis-log".into())
            .spawn(move || write_lines(rx, sink))
            .ok();
        Ok(Self {
            tx: Some(tx),
            thread,
        })
    }

    pub(super) fn sender(&self) -> SyncSender<LogItem> {
        match &self.tx {
            Some(tx) => tx.clone(),
            // Unreachable while self lives; a closed channel just counts drops.
            None => sync_channel(0).0,
        }
    }

    /// Write what is queued, then stop the thread; later records count as dropped.
    /// Blocks until the queue is written.
    pub fn finish(mut self) {
        if let Some(tx) = self.tx.take() {
            let _ = tx.send(LogItem::Stop);
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// How long the writer waits after a record for others to join it in one write.
const BATCH_WINDOW: std::time::Duration = std::time::Duration::from_millis(2);

fn write_lines(rx: Receiver<LogItem>, sink: Box<dyn Write + Send>) {
    let mut out = BufWriter::with_capacity(64 * 1024, sink);
    let write = |out: &mut BufWriter<_>, item| match item {
        LogItem::Record(r) => {
            // The newline even after a failed write: the next record starts a line of its own.
            let _ = r.write_json(out);
            let _ = out.write_all(b"\n");
            true
        }
        LogItem::Stop => false,
    };
    'outer: while let Ok(item) = rx.recv() {
        if !write(&mut out, item) {
            break;
        }
        // Let a busy gateway's records gather for a moment, then write them all and flush:
        // one wake-up of this thread per window instead of one per connection (each one a
        // futex wake on the data path's CPU). Lines still appear within milliseconds.
        std::thread::sleep(BATCH_WINDOW);
        while let Ok(item) = rx.try_recv() {
            if !write(&mut out, item) {
                break 'outer;
            }
        }
        let _ = out.flush();
    }
    let _ = out.flush();
}
