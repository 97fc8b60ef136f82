//! A closed stdout ends a binary quietly, as it ends Unix tools: `jetvlm plan ... | head -1`
//! dies of SIGPIPE once `head` has gone (a shell reports status 141), with no panic, no error
//! line and no exit status of its own.
//!
//! The binaries keep SIGPIPE ignored (Rust's default) rather than restoring its default
//! action: they write to sockets (`jetvlm serve`'s clients, the analytics webhook and MQTT
//! sinks), where a peer that went away is an error to handle, and the default action would
//! kill the whole process on a vectored socket write. Only stdout's reader going away ends the
//! process: [`init`], called first in every `main`, makes `println!`'s "failed printing to
//! stdout" panic that end, and [`crate::exit_on_error`] does the same for an error caused by a
//! broken pipe while stdout is closed ([`stdout_closed`] tells stdout's pipe from the others).

use std::error::Error as StdError;
use std::io::ErrorKind;

/// Installs the panic hook that ends the process quietly when `println!` (or `print!`) finds
/// stdout's reader gone; every other panic goes to the hook that was there before. Called at
/// the start of each binary's `main`.
pub fn init() {
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let payload = info.payload();
        let message = payload
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| payload.downcast_ref::<&str>().copied())
            .unwrap_or("");
        // std's print macros panic with "failed printing to stdout: {io error}".
        if message.starts_with("failed printing to stdout") && stdout_closed() {
            die_of_sigpipe();
        }
        previous(info);
    }));
}

/// Whether stdout is a pipe (or socket) whose reading end is closed: `poll` reports an error
/// condition on it. A terminal, a file or `/dev/null` never is.
pub fn stdout_closed() -> bool {
    #[cfg(unix)]
    {
        let mut fd = libc::pollfd {
            fd: libc::STDOUT_FILENO,
            events: libc::POLLOUT,
            revents: 0,
        };
        // SAFETY: `fd` is one valid pollfd for the duration of the call; timeout 0 returns
        // at once.
        let ready = unsafe { libc::poll(&mut fd, 1, 0) };
        ready == 1 && fd.revents & (libc::POLLERR | libc::POLLHUP) != 0
    }
    #[cfg(not(unix))]
    {
        false
    }
}

/// Whether `err` or one of its causes is a broken pipe (`EPIPE`).
pub fn is_broken_pipe(err: &(dyn StdError + 'static)) -> bool {
    std::iter::successors(Some(err), |e| (*e).source()).any(|e| {
        e.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == ErrorKind::BrokenPipe)
    })
}

/// Ends the process as SIGPIPE's default action does: killed by signal 13, nothing printed.
pub fn die_of_sigpipe() -> ! {
    #[cfg(unix)]
    {
        // SAFETY: restoring a signal's default action and raising it in this thread touch no
        // memory of the program; the default action of SIGPIPE ends the whole process.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
            libc::raise(libc::SIGPIPE);
        }
    }
    // Where the signal did not end the process, the status a shell gives a SIGPIPE death.
    std::process::exit(128 + 13)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct Wrapped(std::io::Error);
    impl std::fmt::Display for Wrapped {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("writing the plan")
        }
    }
    impl StdError for Wrapped {
        fn source(&self) -> Option<&(dyn StdError + 'static)> {
            Some(&self.0)
        }
    }

    #[test]
    fn a_broken_pipe_is_found_among_the_causes() {
        let pipe = Wrapped(std::io::Error::from(ErrorKind::BrokenPipe));
        assert!(is_broken_pipe(&pipe));
        let other = Wrapped(std::io::Error::from(ErrorKind::NotFound));
        assert!(!is_broken_pipe(&other));
        let anyhow = anyhow::Error::new(pipe).context("jetvlm plan");
        assert!(is_broken_pipe(anyhow.as_ref()));
    }
}
