//! How a binary ends when start-up (or the service) fails: one line on
//! stderr that names what failed and why, through every cause, and an exit
//! code of 1. A backtrace only when `RUST_BACKTRACE` asks for one: an
//! operator with a busy port or a file where a folder should be needs the
//! path, not the call stack.

use std::process::ExitCode;

/// Turns `main`'s result into its exit code, reporting a failure.
pub fn exit(service: &str, result: anyhow::Result<()>) -> ExitCode {
    let Err(e) = result else {
        return ExitCode::SUCCESS;
    };
    eprintln!("{}", report(service, &e));
    if backtrace_wanted() {
        // `{:?}` is anyhow's long form: the causes again and the backtrace
        // it captured (it captures only when these variables ask it to).
        eprintln!("{e:?}");
    }
    ExitCode::FAILURE
}

/// `<service>: error: <what>: <cause>: <cause>...` on one line. A cause
/// whose text the line already holds (an error that prints its source
/// inside its own message) is not repeated.
pub fn report(service: &str, e: &anyhow::Error) -> String {
    let mut line = format!("{service}: error: {e}");
    for cause in e.chain().skip(1) {
        let text = cause.to_string();
        if !line.contains(&text) {
            line.push_str(": ");
            line.push_str(&text);
        }
    }
    line
}

/// Binds `addr` (the value of config key `key`); the error names both.
pub async fn bind(
    key: &str,
    addr: std::net::SocketAddr,
) -> std::io::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| std::io::Error::new(e.kind(), format!("{key} = {addr}: {e}")))
}

/// `url` with any password replaced by `***`, fit for an error message.
pub fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let Some(at) = rest[..authority_end].rfind('@') else {
        return url.to_string();
    };
    match rest[..at].split_once(':') {
        Some((user, _)) => format!("{scheme}://{user}:***{}", &rest[at..]),
        None => url.to_string(),
    }
}

fn backtrace_wanted() -> bool {
    ["RUST_BACKTRACE", "RUST_LIB_BACKTRACE"]
        .iter()
        .any(|v| std::env::var_os(v).is_some_and(|x| x != "0"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use anyhow::Context;

    #[test]
    fn passwords_stay_out_of_messages() {
        assert_eq!(
            redact("postgres://app:s3cret@db:5432/chat"),
            "postgres://app:***@db:5432/chat"
        );
        assert_eq!(redact("redis://127.0.0.1:6379/"), "redis://127.0.0.1:6379/");
        assert_eq!(redact("postgres://app@db/chat"), "postgres://app@db/chat");
        assert_eq!(
            redact("sqlite://data/x.db?mode=rwc"),
            "sqlite://data/x.db?mode=rwc"
        );
    }

    #[test]
    fn the_report_names_every_cause_on_one_line() {
        let e = Err::<(), _>(std::io::Error::from_raw_os_error(17))
            .context("log.dir = log: cannot create the folder")
            .unwrap_err();
        let r = report("chatroom", &e);
        assert!(
            r.starts_with("chatroom: error: log.dir = log: cannot create the folder: "),
            "{r}"
        );
        assert!(r.contains("os error 17"), "{r}");
        assert!(!r.contains('\n'), "{r}");
    }
}
