//! Running helper programs (`qemu-img`, `rbd`, ...) directly, never through a shell, with their
//! output kept for the error message and the child killed when the task is stopped.

use std::ffi::OsStr;
use std::process::{ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::Command;

use crate::stop::Stop;

#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    #[error("could not start `{program}`: {source}; is it installed and on PATH?")]
    Spawn { program: String, source: std::io::Error },
    #[error("`{command}` failed ({status}): {}", stderr_or_stdout(.stderr, .stdout))]
    Failed { command: String, status: ExitStatus, stdout: String, stderr: String },
    #[error("`{command}` was stopped before it finished")]
    Stopped { command: String },
    #[error("reading the output of `{command}` failed: {source}")]
    Io { command: String, source: std::io::Error },
}

fn stderr_or_stdout<'a>(stderr: &'a str, stdout: &'a str) -> &'a str {
    let e = stderr.trim();
    if e.is_empty() {
        stdout.trim()
    } else {
        e
    }
}

/// How a child shares the host with the agent and the VMs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Priority {
    /// As the agent: short commands whose answer a request waits for.
    Normal,
    /// A copy of whole images (`qemu-img convert`, `rbd deep cp`, ...): it yields CPU (nice
    /// [`COPY_NICE`]) and disk (lowest best-effort I/O priority) to the agent and the VMs, so a
    /// flatten does not slow every other answer down. Takes longer only on a busy host.
    Copy,
}

/// The niceness added to copy processes.
pub const COPY_NICE: i32 = 10;
/// `IOPRIO_PRIO_VALUE(IOPRIO_CLASS_BE, 7)`: best effort, lowest level (not the idle class, which
/// could starve a copy on a disk the VMs keep busy).
const COPY_IOPRIO: libc::c_int = (2 << 13) | 7;

static LOWER_COPY_PRIORITY: AtomicBool = AtomicBool::new(true);

/// Whether [`Priority::Copy`] children run at lower priority (`tasks.low_priority_copies`; on by
/// default). Set once at start.
pub fn set_low_priority_copies(on: bool) {
    LOWER_COPY_PRIORITY.store(on, Ordering::Relaxed);
}

/// A finished, successful run.
#[derive(Debug)]
pub struct Output {
    pub stdout: String,
    pub stderr: String,
}

/// Renders a command line for messages and logs (not for execution).
pub fn display<S: AsRef<OsStr>>(program: &str, args: &[S]) -> String {
    let mut s = program.to_owned();
    for a in args {
        s.push(' ');
        s.push_str(&a.as_ref().to_string_lossy());
    }
    s
}

/// `program args...` with stdout and stderr piped, killed when dropped and when the agent dies;
/// stdin is the caller's to set. For callers that stream a child's input or output themselves
/// (an image arriving over SSH); others use [`run`].
pub fn child_command<S: AsRef<OsStr>>(program: &str, args: &[S]) -> Command {
    let mut cmd = Command::new(program);
    cmd.args(args).stdout(Stdio::piped()).stderr(Stdio::piped()).kill_on_drop(true);
    // A child outliving a killed agent would go on writing what the next start rolls back (a
    // copy, an RBD clone): it gets SIGKILL when the agent dies. (Children are spawned from the
    // runtime's worker threads, which live as long as the agent.)
    // An agent killed between the fork and the prctl sends no signal: the child checks that
    // its parent is still the agent and gives up otherwise.
    let agent = std::process::id() as libc::pid_t;
    // SAFETY: prctl and getppid are async-signal-safe and touch only the child's own state.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) == -1 {
                return Err(std::io::Error::last_os_error());
            }
            if libc::getppid() != agent {
                return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
            }
            Ok(())
        });
    }
    cmd
}

/// Lowers the child's CPU and I/O priority before it runs, for [`Priority::Copy`] when
/// configured. Best effort: a host that refuses (a seccomp profile) still gets the copy.
fn lower_priority(cmd: &mut Command) {
    // SAFETY: nice(2) and ioprio_set(2) are async-signal-safe and change only the child.
    unsafe {
        cmd.pre_exec(|| {
            libc::nice(COPY_NICE);
            libc::syscall(libc::SYS_ioprio_set, 1 /* IOPRIO_WHO_PROCESS */, 0, COPY_IOPRIO);
            Ok(())
        });
    }
}

/// Runs `program args...` to completion. When `stop` fires first, the child is killed and
/// `Stopped` returned; the caller removes whatever the child was building.
pub async fn run<S: AsRef<OsStr>>(program: &str, args: &[S], stop: &Stop) -> Result<Output, ProcessError> {
    run_with_lines(program, args, stop, |_| {}).await
}

/// Like [`run`], and calls `on_line` with every line (or `\r`-terminated progress update) the
/// child writes to stdout or stderr, e.g. `qemu-img convert -p` or `rbd flatten` progress.
pub async fn run_with_lines<S: AsRef<OsStr>>(
    program: &str,
    args: &[S],
    stop: &Stop,
    on_line: impl FnMut(&str),
) -> Result<Output, ProcessError> {
    run_with_lines_as(program, args, stop, Priority::Normal, on_line).await
}

/// Like [`run_with_lines`], at `priority`.
pub async fn run_with_lines_as<S: AsRef<OsStr>>(
    program: &str,
    args: &[S],
    stop: &Stop,
    priority: Priority,
    mut on_line: impl FnMut(&str),
) -> Result<Output, ProcessError> {
    let command = display(program, args);
    let mut cmd = child_command(program, args);
    cmd.stdin(Stdio::null());
    if priority == Priority::Copy && LOWER_COPY_PRIORITY.load(Ordering::Relaxed) {
        lower_priority(&mut cmd);
    }
    let mut child = cmd.spawn().map_err(|source| ProcessError::Spawn { program: program.to_owned(), source })?;
    let stdout = child.stdout.take().expect("piped stdout");
    let stderr = child.stderr.take().expect("piped stderr");

    // Progress goes to stdout (qemu-img) or stderr (rbd): both streams reach `on_line`.
    let on_line = std::sync::Mutex::new(&mut on_line);
    let call = |l: &str| (on_line.lock().unwrap_or_else(|p| p.into_inner()))(l);
    let (mut to_out, mut to_err) = (call, call);
    let work = async {
        let (out, err, status) =
            tokio::join!(read_lines(stdout, &mut to_out), read_lines(stderr, &mut to_err), child.wait());
        let io = |source| ProcessError::Io { command: command.clone(), source };
        Ok::<_, ProcessError>((out.map_err(io)?, err.map_err(io)?, status.map_err(io)?))
    };
    let (stdout, stderr, status) = tokio::select! {
        r = work => r?,
        _ = stop.stopped() => {
            // kill_on_drop reaps the child when `child` goes out of scope below.
            return Err(ProcessError::Stopped { command });
        }
    };
    if status.success() {
        Ok(Output { stdout, stderr })
    } else {
        Err(ProcessError::Failed { command, status, stdout, stderr })
    }
}

async fn read_lines(r: impl AsyncRead + Unpin, on_line: &mut impl FnMut(&str)) -> std::io::Result<String> {
    let mut reader = BufReader::new(r);
    let mut all = String::new();
    let mut buf = Vec::new();
    loop {
        buf.clear();
        // qemu-img's progress uses '\r'; split on it as well as on '\n'.
        let n = read_until_any(&mut reader, &mut buf).await?;
        if n == 0 {
            return Ok(all);
        }
        let line = String::from_utf8_lossy(&buf);
        on_line(line.trim_end_matches(['\r', '\n']));
        all.push_str(&line);
    }
}

async fn read_until_any<R: AsyncRead + Unpin>(r: &mut BufReader<R>, buf: &mut Vec<u8>) -> std::io::Result<usize> {
    let mut total = 0;
    loop {
        let available = r.fill_buf().await?;
        if available.is_empty() {
            return Ok(total);
        }
        if let Some(i) = available.iter().position(|b| *b == b'\n' || *b == b'\r') {
            buf.extend_from_slice(&available[..=i]);
            r.consume(i + 1);
            return Ok(total + i + 1);
        }
        let n = available.len();
        buf.extend_from_slice(available);
        r.consume(n);
        total += n;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn failure_keeps_stderr() {
        let err = run("sh", &["-c", "echo oops >&2; exit 3"], &Stop::new()).await.unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("oops") && msg.contains("exit status: 3"), "{msg}");
    }

    #[tokio::test]
    async fn progress_lines_split_on_carriage_return() {
        let mut seen = Vec::new();
        run_with_lines("printf", &["a\rb\nc"], &Stop::new(), |l| seen.push(l.to_owned())).await.unwrap();
        assert_eq!(seen, ["a", "b", "c"]);
    }

    #[tokio::test]
    async fn copies_run_at_lower_cpu_and_io_priority() {
        // Field 19 of /proc/self/stat is the niceness; `ionice` prints its own I/O class.
        let nice_of_child = || async {
            let out =
                run_with_lines_as("cat", &["/proc/self/stat"], &Stop::new(), Priority::Copy, |_| {}).await.unwrap();
            let after_comm = out.stdout.rsplit_once(") ").unwrap().1.to_owned();
            after_comm.split_whitespace().nth(16).unwrap().parse::<i32>().unwrap()
        };
        // SAFETY: getpriority reads this process's niceness.
        let own = unsafe { libc::getpriority(libc::PRIO_PROCESS, 0) };
        assert_eq!(nice_of_child().await, (own + COPY_NICE).min(19));
        let normal = run("cat", &["/proc/self/stat"], &Stop::new()).await.unwrap().stdout;
        assert_eq!(normal.rsplit_once(") ").unwrap().1.split_whitespace().nth(16).unwrap(), own.to_string());
        let io = run_with_lines_as("ionice", &[] as &[&str], &Stop::new(), Priority::Copy, |_| {}).await.unwrap();
        assert_eq!(io.stdout.trim(), "best-effort: prio 7");
    }

    #[tokio::test]
    async fn stop_kills_the_child() {
        let stop = Stop::new();
        let s2 = stop.clone();
        tokio::spawn(async move {
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            s2.fire(crate::stop::StopReason::Cancelled);
        });
        let t = std::time::Instant::now();
        let err = run("sleep", &["30"], &stop).await.unwrap_err();
        assert!(matches!(err, ProcessError::Stopped { .. }));
        assert!(t.elapsed().as_secs() < 10);
    }

    #[tokio::test]
    async fn missing_program_is_a_spawn_error() {
        let err = run("kvmagent-no-such-program", &["x"], &Stop::new()).await.unwrap_err();
        assert!(matches!(err, ProcessError::Spawn { .. }), "{err}");
    }
}
