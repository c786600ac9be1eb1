//! `smsgw erase --to NUMBER [--yes]`: a person's right to erasure. Without `--yes` it says
//! what it would do and changes nothing.

use std::process::ExitCode;

use super::EXIT_FAILED;
use crate::{
    config::Settings,
    phone::PhoneNumber,
    store::{Erasure, Store},
};

/// Erases what smsgw keeps of `number` (or, without `apply`, counts it) and prints it.
pub async fn erase(settings: &Settings, number: &PhoneNumber, apply: bool) -> ExitCode {
    let store = match Store::connect(settings.store.url.expose(), 1).await {
        Ok(store) => store,
        Err(e) => {
            eprintln!("smsgw: message log unavailable: {e}");
            return ExitCode::from(EXIT_FAILED);
        }
    };
    let masked = number.masked();
    let done = if apply {
        store.erase(number.as_str(), &masked).await
    } else {
        store.erasure_preview(number.as_str()).await
    };
    store.close().await;
    match done {
        Ok(erasure) => {
            print!("{}", report(&masked, &erasure, apply));
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("smsgw: nothing erased, the message log is unavailable: {e}");
            ExitCode::from(EXIT_FAILED)
        }
    }
}

/// What was (or would be) done, one line a kind of record; the number only masked.
fn report(masked: &str, erasure: &Erasure, applied: bool) -> String {
    let (verb, end) = if applied {
        ("erased", "")
    } else {
        (
            "would erase",
            "nothing changed: run again with --yes to erase\n",
        )
    };
    format!(
        "{verb} {masked}:\n\
         \x20 messages: {} (bodies and the providers' error texts removed, number masked; \
         school, type, segments, dates and statuses kept for billing)\n\
         \x20 replies: {} (bodies removed, number masked)\n\
         \x20 inbox copies: {} (deleted)\n\
         \x20 login-code records: {} (deleted)\n\
         \x20 opt-outs: {} (kept, so that the number is never texted again)\n{end}",
        erasure.messages,
        erasure.replies,
        erasure.inbox_copies,
        erasure.login_codes,
        erasure.opt_outs_kept,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_preview_says_it_changed_nothing_and_never_shows_the_number() {
        let erasure = Erasure {
            messages: 3,
            replies: 1,
            inbox_copies: 2,
            login_codes: 0,
            opt_outs_kept: 1,
        };
        let preview = report("+44*******123", &erasure, false);
        assert!(preview.starts_with("would erase +44*******123:"));
        assert!(preview.contains("messages: 3") && preview.contains("opt-outs: 1 (kept"));
        assert!(preview.contains("nothing changed"));
        let done = report("+44*******123", &erasure, true);
        assert!(done.starts_with("erased ") && !done.contains("nothing changed"));
    }
}
