//! Windows: which instance of a rule's state an event belongs to.
//!
//! The instance name is part of the state key and of every award, so a
//! `day` window later yields e.g. `"2025-06-01"` and a fresh count per day
//! with no change elsewhere; `lifetime` has exactly one instance.

use std::borrow::Cow;

use edge_config::Window;

/// Instance name of a `lifetime` window.
pub const LIFETIME: &str = "lifetime";

/// The window instance an event at `time_ms` falls into.
pub fn instance(window: &Window, _time_ms: i64) -> Cow<'static, str> {
    match window {
        Window::Lifetime => Cow::Borrowed(LIFETIME),
    }
}
