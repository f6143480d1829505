//! The connection log writer: a dedicated thread that drains a bounded queue of records into
//! stdout or a file, one JSON line each. The data path only ever `try_send`s into the queue.

use std::fs::OpenOptions;
use std::io::{BufWriter, Write};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::thread::JoinHandle;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use super::ConnectionRecord;
use super::metrics::AgentMetrics;
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
    /// A record and its agent's handles (whose queued-lines count the writer lowers).
    Record(ConnectionRecord, Arc<AgentMetrics>),
    /// A control-plane event (kill switch, admin), already one JSON object.
    Line(String),
    /// Write what is queued before this, then exit.
    Stop,
}

/// Owns the writer thread. Dropping every [`super::Telemetry`] and this writer ends it.
pub struct LogWriter {
    tx: Option<SyncSender<LogItem>>,
    /// The queue's size in lines.
    capacity: usize,
    /// Lines in the queue now (raised by the senders, lowered by the writer).
    queued: Arc<AtomicUsize>,
    thread: Option<JoinHandle<()>>,
    /// The writer thread's id, for the tests that count its wake-ups.
    #[cfg(test)]
    tid: std::sync::Arc<std::sync::atomic::AtomicI32>,
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
        let queued = Arc::new(AtomicUsize::new(0));
        let queued_in_thread = queued.clone();
        #[cfg(test)]
        let tid = std::sync::Arc::new(std::sync::atomic::AtomicI32::new(0));
        #[cfg(test)]
        let tid_in_thread = tid.clone();
        let thread = std::thread::Builder::new()
            .name("portcullis-log".into())
            .spawn(move || {
                // Below the data path: woken by its timer, the writer must not preempt a
                // worker in the middle of a tunnel (a 10 ms batch takes ~100 µs to write);
                // it runs when the worker waits, and still gets its share (nice 10: ~10 %)
                // when the core is saturated. Linux sets the nice value per thread; best
                // effort, as in a container that forbids it.
                let _ = rustix::process::setpriority_process(None, WRITER_NICE);
                #[cfg(test)]
                tid_in_thread.store(
                    rustix::thread::gettid().as_raw_nonzero().get(),
                    std::sync::atomic::Ordering::SeqCst,
                );
                write_lines(rx, sink, &queued_in_thread);
            })
            .ok();
        Ok(Self {
            tx: Some(tx),
            capacity: queue,
            queued,
            thread,
            #[cfg(test)]
            tid,
        })
    }

    /// The queue's size in lines.
    pub(super) fn capacity(&self) -> usize {
        self.capacity
    }

    /// The count of lines in the queue, shared with the senders.
    pub(super) fn queued(&self) -> Arc<AtomicUsize> {
        self.queued.clone()
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

/// How long the writer lets records gather before it writes them. While records keep coming
/// it wakes once per window, on its own timer: the data path never wakes it then (a send
/// into the queue wakes the thread only when it is blocked waiting for the first record).
/// Lines appear within two windows.
const BATCH_WINDOW: std::time::Duration = std::time::Duration::from_millis(10);

/// The writer thread's nice value (the data path runs at 0).
const WRITER_NICE: i32 = 10;

fn write_lines(rx: Receiver<LogItem>, sink: Box<dyn Write + Send>, queued: &AtomicUsize) {
    let mut out = BufWriter::with_capacity(64 * 1024, sink);
    // Each record is formatted whole, then handed to the buffer in one piece, so the buffer
    // only ever writes whole lines: a reader tailing the file never finds a record cut at
    // a 64 KiB flush.
    let mut line = Vec::with_capacity(1024);
    let mut write = move |out: &mut BufWriter<_>, item| match item {
        LogItem::Record(r, agent) => {
            line.clear();
            r.write_json(&mut line);
            line.push(b'\n');
            let _ = out.write_all(&line);
            agent.log_queued.fetch_sub(1, Ordering::Relaxed);
            queued.fetch_sub(1, Ordering::Relaxed);
            true
        }
        LogItem::Line(mut text) => {
            text.push('\n');
            let _ = out.write_all(text.as_bytes());
            queued.fetch_sub(1, Ordering::Relaxed);
            true
        }
        LogItem::Stop => false,
    };
    // Idle: blocked until the first record, which wakes this thread (a futex wake on the
    // data path's CPU, once per busy spell instead of once per record or per window).
    'idle: while let Ok(item) = rx.recv() {
        if !write(&mut out, item) {
            break;
        }
        // Busy: one timer wake-up per window while records keep coming (each wake-up is two
        // context switches on the data path's core), then back to blocking.
        loop {
            std::thread::sleep(BATCH_WINDOW);
            let mut any = false;
            while let Ok(item) = rx.try_recv() {
                any = true;
                if !write(&mut out, item) {
                    break 'idle;
                }
            }
            let _ = out.flush();
            if !any {
                continue 'idle;
            }
        }
    }
    let _ = out.flush();
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::telemetry::Mode;
    use std::path::{Path, PathBuf};
    use std::sync::atomic::Ordering;
    use std::time::{Duration, Instant};

    /// A writer to `dir/connections.log`, its queue and the file's path, with one line
    /// written: the writer thread is up and has its id set.
    fn started_and_written(dir: &Path) -> (LogWriter, SyncSender<LogItem>, PathBuf) {
        let path = dir.join("connections.log");
        let writer = LogWriter::start(&LogDestination::File(path.clone()), 65_536).unwrap();
        let tx = writer.sender();
        tx.send(record(1)).unwrap();
        assert!(wait_for_lines(&path, 1), "the first line was not written");
        (writer, tx, path)
    }

    /// `/proc/self/task/<writer>/<file>`.
    fn writer_proc(writer: &LogWriter, file: &str) -> String {
        let tid = writer.tid.load(Ordering::SeqCst);
        assert_ne!(tid, 0, "the writer thread has not started");
        std::fs::read_to_string(format!("/proc/self/task/{tid}/{file}")).unwrap()
    }

    fn record(port: u16) -> LogItem {
        let source = std::net::SocketAddr::from(([127, 0, 0, 1], port));
        LogItem::Record(
            ConnectionRecord::begin(Mode::Explicit, source, "t".into(), 1),
            Arc::new(crate::telemetry::Metrics::new()).agent("t"),
        )
    }

    fn lines(path: &Path) -> Vec<String> {
        std::fs::read_to_string(path)
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect()
    }

    /// Wait (at most 2 s, polling) until the file has `n` lines.
    fn wait_for_lines(path: &Path, n: usize) -> bool {
        let deadline = Instant::now() + Duration::from_secs(2);
        while Instant::now() < deadline {
            if lines(path).len() >= n {
                return true;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        lines(path).len() >= n
    }

    /// The writer thread's voluntary context switches so far (each sleep or blocking wait
    /// that ended is one).
    fn writer_wakeups(writer: &LogWriter) -> u64 {
        writer_proc(writer, "status")
            .lines()
            .find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    }

    /// A sink that keeps each `write` call's bytes apart.
    #[derive(Clone, Default)]
    struct Writes(std::sync::Arc<std::sync::Mutex<Vec<Vec<u8>>>>);

    impl Write for Writes {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().push(buf.to_vec());
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// Every write to the sink ends at the end of a line, also when a burst fills the
    /// 64 KiB buffer many times over: a reader tailing the file sees whole records only.
    #[test]
    fn the_sink_is_written_whole_lines_at_a_time() {
        let (tx, rx) = sync_channel(4096);
        for port in 1..=2000 {
            tx.send(record(port)).unwrap();
        }
        tx.send(LogItem::Stop).unwrap();
        let writes = Writes::default();
        write_lines(
            rx,
            Box::new(writes.clone()),
            &AtomicUsize::new(usize::MAX / 2),
        );
        let writes = writes.0.lock().unwrap();
        assert!(writes.len() > 2, "the burst should take several writes");
        for (i, w) in writes.iter().enumerate() {
            assert_eq!(w.last(), Some(&b'\n'), "write {i} ends mid-line");
        }
        let lines: usize = writes
            .iter()
            .map(|w| w.iter().filter(|&&b| b == b'\n').count())
            .sum();
        assert_eq!(lines, 2000);
    }

    /// The writer runs below the data path (a higher nice value; raising one's own needs
    /// no privilege), so its batches wait for the worker instead of preempting it.
    #[test]
    fn the_writer_runs_below_the_data_path() {
        let dir = tempfile::tempdir().unwrap();
        let (writer, _tx, _path) = started_and_written(dir.path());
        let stat = writer_proc(&writer, "stat");
        // After the parenthesised name: state is field 3 of stat(5), nice field 19.
        let after_name = stat.rsplit_once(')').unwrap().1;
        let nice: i32 = after_name
            .split_whitespace()
            .nth(19 - 3)
            .unwrap()
            .parse()
            .unwrap();
        writer.finish();
        assert_eq!(nice, WRITER_NICE);
    }

    /// Lines reach the file while the gateway runs, not only at the end: the first of a
    /// busy spell, a record after the writer went back to waiting, and a burst; `finish`
    /// writes whatever is still queued.
    #[test]
    fn lines_appear_within_windows_and_finish_writes_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let (writer, tx, path) = started_and_written(dir.path());
        // Long enough for a window with nothing: the writer blocks again.
        std::thread::sleep(BATCH_WINDOW * 4);
        tx.send(record(2)).unwrap();
        assert!(
            wait_for_lines(&path, 2),
            "a line after an idle spell was not written"
        );
        for port in 3..=500 {
            tx.send(record(port)).unwrap();
        }
        assert!(
            wait_for_lines(&path, 500),
            "a burst was not written while running"
        );
        tx.send(record(501)).unwrap();
        writer.finish();
        let written = lines(&path);
        assert_eq!(written.len(), 501);
        for (i, line) in written.iter().enumerate() {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            assert_eq!(v["source.port"], i + 1, "line {i}: {line}");
        }
    }

    /// While records keep coming the writer wakes once per window on its own timer, never
    /// once per record (each wake-up is two context switches on the data path's core):
    /// 1,500 records over 300 ms cost about 30 wake-ups. Waking per record would be 1,500;
    /// the earlier design (a 2 ms window, and a wake-up from the sender for each) about 300.
    #[test]
    fn a_busy_writer_wakes_once_per_window_not_per_record() {
        let dir = tempfile::tempdir().unwrap();
        let (writer, tx, path) = started_and_written(dir.path());
        let before = writer_wakeups(&writer);
        let started = Instant::now();
        let mut sent = 1;
        while started.elapsed() < Duration::from_millis(300) && sent < 100_000 {
            tx.send(record(2)).unwrap();
            sent += 1;
            std::thread::sleep(Duration::from_micros(200));
        }
        let elapsed = started.elapsed();
        let wakeups = writer_wakeups(&writer) - before;
        let windows = (elapsed.as_millis() / BATCH_WINDOW.as_millis()) as u64;
        writer.finish();
        assert_eq!(lines(&path).len(), sent);
        assert!(
            wakeups <= 2 * windows + 10,
            "{wakeups} writer wake-ups for {sent} records in {elapsed:?} ({windows} windows)"
        );
    }
}
