//! Checks that rule predicates compile as CEL, without keeping them.
//!
//! The CEL parser recurses deeply (well over 100 KiB of stack per nesting
//! level in debug builds) and a stack overflow aborts the process, so
//! compilation runs on its own thread with a large stack; expressions are
//! also capped in length so no input can exhaust even that. A panic inside
//! the parser is caught and reported like a syntax error.

use std::panic::{self, AssertUnwindSafe};

/// Stack of the compile thread. Only touched pages are ever backed by
/// memory, so a large reservation costs nothing on ordinary input.
const STACK_SIZE: usize = 256 * 1024 * 1024;

/// Longest `when` accepted, in bytes: far beyond any real predicate, and
/// short enough that the parser stays within [`STACK_SIZE`].
pub(crate) const MAX_EXPRESSION_LEN: usize = 16 * 1024;

/// Why an expression does not compile.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct CelProblem {
    /// 1-based line and column inside the expression, when the parser
    /// gave a usable one.
    pub position: Option<(usize, usize)>,
    pub message: String,
}

/// Compiles every expression; one result per expression, in order.
pub(crate) fn check_all(expressions: Vec<String>) -> Vec<Result<(), CelProblem>> {
    if expressions.is_empty() {
        return Vec::new();
    }
    let count = expressions.len();
    let spawned = std::thread::Builder::new()
        .name("cel-check".to_owned())
        .stack_size(STACK_SIZE)
        .spawn(move || expressions.iter().map(|e| check(e)).collect::<Vec<_>>());
    let failed = |message: String| {
        vec![
            Err(CelProblem {
                position: None,
                message,
            });
            count
        ]
    };
    match spawned {
        Ok(handle) => handle.join().unwrap_or_else(|_| {
            failed("the CEL compiler thread failed; the expression could not be checked".to_owned())
        }),
        Err(e) => failed(format!(
            "cannot start the CEL compiler thread ({e}); the expression could not be checked"
        )),
    }
}

fn check(expression: &str) -> Result<(), CelProblem> {
    if expression.len() > MAX_EXPRESSION_LEN {
        return Err(CelProblem {
            position: None,
            message: format!(
                "expression is {} bytes long; at most {MAX_EXPRESSION_LEN} are allowed",
                expression.len()
            ),
        });
    }
    let compiled = panic::catch_unwind(AssertUnwindSafe(|| {
        cel::Program::compile(expression).map(drop).map_err(|e| {
            let more = e.errors.len().saturating_sub(1);
            e.errors
                .into_iter()
                .next()
                .map(|first| problem(first.pos, &first.msg, more))
        })
    }));
    match compiled {
        Ok(Ok(())) => Ok(()),
        Ok(Err(Some(problem))) => Err(problem),
        Ok(Err(None)) => Err(CelProblem {
            position: None,
            message: "invalid CEL".to_owned(),
        }),
        Err(_) => Err(CelProblem {
            position: None,
            message: "the CEL parser failed on this expression".to_owned(),
        }),
    }
}

fn problem(pos: (isize, isize), msg: &str, more: usize) -> CelProblem {
    // The parser's recursion guard wraps its message in a debug dump with
    // token indexes for a position; say it plainly instead.
    if let Some(at) = msg.find("Recursion limit of ") {
        let limit: String = msg[at + "Recursion limit of ".len()..]
            .chars()
            .take_while(char::is_ascii_digit)
            .collect();
        return CelProblem {
            position: None,
            message: format!(
                "invalid CEL: expression nested too deeply (the parser allows {limit} levels)"
            ),
        };
    }
    let position = match (usize::try_from(pos.0), usize::try_from(pos.1)) {
        (Ok(line), Ok(column)) if line >= 1 && column >= 1 => Some((line, column)),
        _ => None,
    };
    let more = match more {
        0 => String::new(),
        1 => " (and 1 more error)".to_owned(),
        n => format!(" (and {n} more errors)"),
    };
    CelProblem {
        position,
        message: format!("invalid CEL: {msg}{more}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(expression: &str) -> Result<(), CelProblem> {
        check_all(vec![expression.to_owned()])
            .pop()
            .expect("one result")
    }

    #[test]
    fn valid_expressions_pass() {
        for e in [
            "data.intensity >= 2",
            "event.type == 'fan.cheer' && size(data.zones) > 0",
            "has(data.team) ? data.team == 'A' : false",
        ] {
            assert_eq!(one(e), Ok(()), "{e}");
        }
    }

    #[test]
    fn syntax_errors_have_a_position() {
        let err = one("data.intensity >=").expect_err("incomplete");
        assert_eq!(err.position, Some((1, 18)));
        assert!(err.message.starts_with("invalid CEL: "), "{}", err.message);
        let err = one("x +\n  (y").expect_err("unclosed");
        assert_eq!(err.position, Some((2, 5)));
    }

    #[test]
    fn deep_nesting_is_an_error_not_a_crash() {
        for e in [
            format!("{}x{}", "(".repeat(5000), ")".repeat(5000)),
            format!("{}x{}", "[".repeat(5000), "]".repeat(5000)),
            format!("{}x{}", "f(".repeat(4000), ")".repeat(4000)),
        ] {
            let err = one(&e).expect_err("too deep");
            assert!(err.message.contains("nested too deeply"), "{}", err.message);
        }
        // Long flat chains are fine up to the length cap.
        let chain = format!("x{}", "+x".repeat(MAX_EXPRESSION_LEN / 2 - 1));
        assert!(chain.len() <= MAX_EXPRESSION_LEN);
        assert_eq!(one(&chain), Ok(()));
    }

    #[test]
    fn overlong_expressions_are_refused_before_parsing() {
        let long = format!("x{}", " || x".repeat(MAX_EXPRESSION_LEN));
        let err = one(&long).expect_err("too long");
        assert!(err.message.contains("at most"), "{}", err.message);
    }

    #[test]
    fn results_keep_the_input_order() {
        let results = check_all(vec!["a == 1".into(), "a ==".into(), "b".into()]);
        assert_eq!(results.len(), 3);
        assert!(results[0].is_ok());
        assert!(results[1].is_err());
        assert!(results[2].is_ok());
    }
}
