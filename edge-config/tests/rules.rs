//! Rule file parsing: the seed rule, defaults, every documented check and
//! CEL errors placed at their spot in the file.

use std::collections::BTreeMap;
use std::path::Path;

use std::time::Duration;

use edge_config::{
    parse_rules, AchievementRule, ConfigErrors, Diagnostic, Limits, Measure, Scope, Tier, Window,
};

const PATH: &str = "/srv/rules/cheer.toml";

const SEED: &str = r#"[[achievement]]
id = "cheer-leader"
name = "Cheer Leader"
on = ["fan.cheer"]                 # event types
when = "data.intensity >= 2"       # CEL predicate over the event; optional
measure = "count"
window = "lifetime"
tiers = [ { at = 10, badge = "cheer-bronze", points = { xp = 50 } },
          { at = 50, badge = "cheer-silver", points = { xp = 200 } } ]
"#;

/// A valid rule to edit in tests, one key per line.
const RULE: &str = r#"[[achievement]]
id = "r"
name = "R"
on = ["fan.cheer"]
measure = "count"
window = "lifetime"
tiers = [ { at = 1 }, { at = 2 } ]
"#;

fn parse(text: &str) -> Result<Vec<AchievementRule>, ConfigErrors> {
    parse_rules(text, Path::new(PATH))
}

fn ok(text: &str) -> Vec<AchievementRule> {
    parse(text).unwrap_or_else(|e| panic!("rules should be valid, got:\n{e}"))
}

fn errors(text: &str) -> Vec<Diagnostic> {
    match parse(text) {
        Ok(rules) => panic!("rules should be invalid, parsed as {rules:#?}"),
        Err(e) => e.0,
    }
}

#[track_caller]
fn expect_only_error(text: &str, line: usize, field: &str, needle: &str) -> Diagnostic {
    let errs = errors(text);
    let found = errs
        .iter()
        .find(|d| d.line == line && d.field == field && d.message.contains(needle))
        .cloned();
    let Some(found) = found else {
        panic!(
            "no error at line {line} on `{field}` containing {needle:?}; got:\n{}",
            ConfigErrors(errs)
        );
    };
    assert_eq!(
        errs.len(),
        1,
        "expected one error, got:\n{}",
        ConfigErrors(errs)
    );
    assert_eq!(found.file, Path::new(PATH));
    assert!(found
        .to_string()
        .starts_with(&format!("{PATH}:{line}:{}: {field}: ", found.column)));
    found
}

#[test]
fn the_seed_rule_parses() {
    let rules = ok(SEED);
    assert_eq!(
        rules,
        [AchievementRule {
            id: "cheer-leader".to_owned(),
            name: "Cheer Leader".to_owned(),
            version: 1,
            on: vec!["fan.cheer".to_owned()],
            when: Some("data.intensity >= 2".to_owned()),
            measure: Measure::Count,
            window: Window::Lifetime,
            lateness: Duration::from_secs(30),
            scope: Scope::Customer,
            limits: Limits::default(),
            sources: None,
            referral: None,
            tiers: vec![
                Tier {
                    at: 10.0,
                    badge: Some("cheer-bronze".to_owned()),
                    points: BTreeMap::from([("xp".to_owned(), 50)]),
                    voucher: None,
                },
                Tier {
                    at: 50.0,
                    badge: Some("cheer-silver".to_owned()),
                    points: BTreeMap::from([("xp".to_owned(), 200)]),
                    voucher: None,
                },
            ],
            file: Path::new(PATH).to_path_buf(),
            line: 1,
        }]
    );
}

#[test]
fn rules_record_their_line_and_keep_file_order() {
    let text = format!(
        "# two rules\n\n{}\n{}\n[[achievement]]\nid = \"c\"\nname = \"C\"\nversion = 3\non = [\"a\", \"b\"]\nmeasure = \"count\"\nwindow = \"lifetime\"\n\n[[achievement.tiers]]\nat = 5\npoints = {{ xp = -1, coins = 0 }}\n\n[[achievement.tiers]]\nat = 6.0\nbadge = \"six\"\n",
        RULE.replace("id = \"r\"", "id = \"b\""),
        RULE.replace("id = \"r\"", "id = \"a\""),
    );
    let rules = ok(&text);
    let ids: Vec<(&str, usize)> = rules.iter().map(|r| (r.id.as_str(), r.line)).collect();
    assert_eq!(ids, [("b", 3), ("a", 11), ("c", 19)]);
    let c = &rules[2];
    assert_eq!(c.version, 3);
    assert_eq!(c.on, ["a", "b"]);
    assert_eq!(c.when, None);
    assert_eq!(c.tiers.len(), 2);
    assert_eq!(
        c.tiers[0].points,
        BTreeMap::from([("coins".to_owned(), 0), ("xp".to_owned(), -1)])
    );
    assert_eq!(c.tiers[1].at, 6.0);
    assert_eq!(c.tiers[1].badge.as_deref(), Some("six"));
    assert!(c.tiers[1].points.is_empty());
}

#[test]
fn empty_files_hold_no_rules() {
    assert!(ok("").is_empty());
    assert!(ok("# nothing yet\n").is_empty());
}

#[test]
fn required_keys() {
    for (key, line_text) in [
        ("id", "id = \"r\"\n"),
        ("name", "name = \"R\"\n"),
        ("on", "on = [\"fan.cheer\"]\n"),
        ("measure", "measure = \"count\"\n"),
        ("window", "window = \"lifetime\"\n"),
        ("tiers", "tiers = [ { at = 1 }, { at = 2 } ]\n"),
    ] {
        let d = expect_only_error(
            &RULE.replace(line_text, ""),
            1,
            &format!("achievement[0].{key}"),
            "required key is missing",
        );
        assert!(d.message.contains("[achievement[0]]"), "{}", d.message);
    }
}

#[test]
fn rule_field_checks() {
    expect_only_error(
        &RULE.replace("id = \"r\"", "id = \"cheer leader\""),
        2,
        "achievement[0].id",
        "contains ' '",
    );
    expect_only_error(
        &RULE.replace("id = \"r\"", &format!("id = \"{}\"", "x".repeat(65))),
        2,
        "achievement[0].id",
        "longer than 64",
    );
    expect_only_error(
        &RULE.replace("name = \"R\"", "name = \" \""),
        3,
        "achievement[0].name",
        "must not be empty",
    );
    expect_only_error(
        &format!("{RULE}version = 0\n"),
        8,
        "achievement[0].version",
        "at least 1",
    );
    expect_only_error(
        &format!("{RULE}version = 4294967296\n"),
        8,
        "achievement[0].version",
        "out of range",
    );
    expect_only_error(
        &RULE.replace("[\"fan.cheer\"]", "[]"),
        4,
        "achievement[0].on",
        "at least one event type",
    );
    expect_only_error(
        &RULE.replace("[\"fan.cheer\"]", "[\"fan.cheer\", \"\"]"),
        4,
        "achievement[0].on[1]",
        "must not be empty",
    );
    expect_only_error(
        &RULE.replace("[\"fan.cheer\"]", "[\"fan.cheer\", \"fan.cheer\"]"),
        4,
        "achievement[0].on[1]",
        "listed twice",
    );
    expect_only_error(
        &RULE.replace("[\"fan.cheer\"]", "\"fan.cheer\""),
        4,
        "achievement[0].on",
        "expected an array of strings, found string",
    );
    expect_only_error(
        &format!("{RULE}when = \"\"\n"),
        8,
        "achievement[0].when",
        "leave `when` out",
    );
    expect_only_error(
        &format!("{RULE}when = true\n"),
        8,
        "achievement[0].when",
        "expected a string, found boolean",
    );
}

#[test]
fn unknown_measures_and_windows_list_the_known_ones() {
    let d = expect_only_error(
        &RULE.replace("measure = \"count\"", "measure = \"avg\""),
        5,
        "achievement[0].measure",
        "unknown measure `avg`; supported: `count`, `sum`, `distinct`, `max`, `min`, `streak`, `sequence`",
    );
    assert_eq!(d.column, 11);
    expect_only_error(
        &RULE.replace("window = \"lifetime\"", "window = \"match\""),
        6,
        "achievement[0].window",
        "unknown window `match`; supported: `lifetime`",
    );
    expect_only_error(
        &RULE.replace("measure = \"count\"", "measure = { sum = \"data.amount\" }"),
        5,
        "achievement[0].measure",
        "expected a string, found table",
    );
}

#[test]
fn tier_checks() {
    let tiers = |t: &str| RULE.replace("[ { at = 1 }, { at = 2 } ]", t);
    expect_only_error(&tiers("[]"), 7, "achievement[0].tiers", "at least one tier");
    expect_only_error(
        &tiers("[ { at = 0 } ]"),
        7,
        "achievement[0].tiers[0].at",
        "greater than 0",
    );
    expect_only_error(
        &tiers("[ { at = -3 } ]"),
        7,
        "achievement[0].tiers[0].at",
        "greater than 0",
    );
    let d = expect_only_error(
        &tiers("[ { at = 10 }, { at = 5 } ]"),
        7,
        "achievement[0].tiers[1].at",
        "strictly ascending order of `at`; 5 does not exceed the previous tier's 10",
    );
    assert_eq!(d.column, 31);
    expect_only_error(
        &tiers("[ { at = 10 }, { at = 10 } ]"),
        7,
        "achievement[0].tiers[1].at",
        "strictly ascending",
    );
    expect_only_error(
        &tiers("[ { at = 2.5 } ]"),
        7,
        "achievement[0].tiers[0].at",
        "whole numbers",
    );
    expect_only_error(
        &tiers("[ { at = nan } ]"),
        7,
        "achievement[0].tiers[0].at",
        "finite",
    );
    expect_only_error(
        &tiers("[ { at = \"10\" } ]"),
        7,
        "achievement[0].tiers[0].at",
        "expected a number, found string",
    );
    expect_only_error(
        &tiers("[ { badge = \"b\" } ]"),
        7,
        "achievement[0].tiers[0].at",
        "required key is missing",
    );
    expect_only_error(
        &tiers("[ { at = 1, badge = \"\" } ]"),
        7,
        "achievement[0].tiers[0].badge",
        "must not be empty",
    );
    expect_only_error(
        &tiers("[ { at = 1, points = { xp = 1.5 } } ]"),
        7,
        "achievement[0].tiers[0].points.xp",
        "expected an integer, found float",
    );
    expect_only_error(
        &tiers("[ { at = 1, points = { \"x p\" = 1 } } ]"),
        7,
        "achievement[0].tiers[0].points.x p",
        "point category `x p` contains ' '",
    );
    expect_only_error(
        &tiers("[ { at = 1, points = 5 } ]"),
        7,
        "achievement[0].tiers[0].points",
        "expected a table, found integer",
    );
    expect_only_error(
        &tiers("[ { at = 1, xp = 5 } ]"),
        7,
        "achievement[0].tiers[0].xp",
        "unknown key `xp` in [achievement[0].tiers[0]]; expected one of: at, badge, points",
    );
    let errs = errors(&tiers("[ 1, 2 ]"));
    let got: Vec<(usize, usize, &str, &str)> = errs
        .iter()
        .map(|d| (d.line, d.column, d.field.as_str(), d.message.as_str()))
        .collect();
    assert_eq!(
        got,
        [
            (
                7,
                11,
                "achievement[0].tiers[0]",
                "expected a table, found integer"
            ),
            (
                7,
                14,
                "achievement[0].tiers[1]",
                "expected a table, found integer"
            ),
        ]
    );
}

#[test]
fn unknown_keys_and_shapes() {
    expect_only_error(
        &format!("{RULE}weight = 2\n"),
        8,
        "achievement[0].weight",
        "unknown key `weight` in [achievement[0]]",
    );
    expect_only_error(
        &format!("[[offer]]\nid = \"x\"\n{RULE}"),
        1,
        "offer",
        "unknown key `offer` at the top level; expected one of: achievement",
    );
    expect_only_error(
        "[achievement]\nid = \"x\"\n",
        1,
        "achievement",
        "expected an array of tables ([[achievement]]), found table",
    );
}

#[test]
fn ids_are_unique_within_a_file() {
    let text = format!("{RULE}\n{RULE}");
    let d = expect_only_error(
        &text,
        10,
        "achievement[1].id",
        "duplicate rule id `r`: already used by the rule at line 1",
    );
    assert_eq!(d.column, 6);
}

#[test]
fn every_problem_of_every_rule_is_reported() {
    let text = format!(
        "{}\n{}",
        RULE.replace("id = \"r\"", "id = \"a b\"")
            .replace("measure = \"count\"", "measure = \"avg\"")
            .replace(
                "window = \"lifetime\"",
                "window = \"lifetime\"\nwhen = \"data.x >\""
            ),
        RULE.replace("{ at = 2 }", "{ at = 0 }")
    );
    let errs = errors(&text);
    let got: Vec<(usize, &str)> = errs.iter().map(|d| (d.line, d.field.as_str())).collect();
    assert_eq!(
        got,
        [
            (2, "achievement[0].id"),
            (5, "achievement[0].measure"),
            (7, "achievement[0].when"),
            (16, "achievement[1].tiers[1].at"),
        ],
        "{}",
        ConfigErrors(errs.clone())
    );
}

#[test]
fn invalid_cel_points_into_the_expression() {
    // Plain string: the error lands on the character the parser names.
    let d = expect_only_error(
        &format!("{RULE}when = \"data.intensity >= \"\n"),
        8,
        "achievement[0].when",
        "invalid CEL: ",
    );
    // `when = "` is 8 characters; the expression's column 19 is past its end.
    assert_eq!(d.column, 8 + 19);

    // Literal string: no escapes possible, same mapping.
    let d = expect_only_error(
        &format!("{RULE}when = 'a &&& b'\n"),
        8,
        "achievement[0].when",
        "invalid CEL",
    );
    assert_eq!(d.column, 8 + 5);

    // Multi-line string: lines map too. The expression ends with the
    // newline before the closing quotes, where the parser misses a `)`.
    let d = expect_only_error(
        &format!("{RULE}when = \"\"\"\ndata.a == 1 &&\n  (data.b\n\"\"\"\n"),
        11,
        "achievement[0].when",
        "missing ')'",
    );
    assert_eq!(d.column, 1);
    let d = expect_only_error(
        &format!("{RULE}when = \"\"\"\ndata.a == 1 &&\n  data.b &&& 2\"\"\"\n"),
        10,
        "achievement[0].when",
        "invalid CEL",
    );
    // The third `&`, as for "a &&& b" above.
    assert_eq!(d.column, 12);

    // With escapes the text differs from the expression: point at the
    // value and say where inside the expression.
    let d = expect_only_error(
        &format!("{RULE}when = \"data.name == \\\"x\\\" &&\"\n"),
        8,
        "achievement[0].when",
        "of the expression)",
    );
    assert_eq!(d.column, 8);
}

#[test]
fn pathological_cel_is_an_error_not_a_crash() {
    let deep = format!("{}x{}", "(".repeat(3000), ")".repeat(3000));
    let d = expect_only_error(
        &format!("{RULE}when = \"{deep}\"\n"),
        8,
        "achievement[0].when",
        "nested too deeply",
    );
    assert_eq!(d.column, 8);
    let long = format!("x{}", " || x".repeat(5000));
    expect_only_error(
        &format!("{RULE}when = \"{long}\"\n"),
        8,
        "achievement[0].when",
        "at most 16384",
    );
}

#[test]
fn valid_cel_in_several_rules_passes() {
    let text = format!(
        "{}\n{}",
        RULE.replace("window = \"lifetime\"", "window = \"lifetime\"\nwhen = \"data.intensity >= 2 && event.subject != ''\""),
        RULE.replace("id = \"r\"", "id = \"s\"")
            .replace("window = \"lifetime\"", "window = \"lifetime\"\nwhen = '''\nhas(data.zone) &&\n  data.zone in [\"north\", \"south\"]\n'''"),
    );
    let rules = ok(&text);
    assert_eq!(
        rules[0].when.as_deref(),
        Some("data.intensity >= 2 && event.subject != ''")
    );
    assert_eq!(
        rules[1].when.as_deref(),
        Some("has(data.zone) &&\n  data.zone in [\"north\", \"south\"]\n")
    );
}

#[test]
fn syntax_errors_in_rule_files() {
    let errs = errors(&RULE.replace("name = \"R\"", "name = R"));
    assert_eq!(errs[0].line, 3);
    assert_eq!(errs[0].field, "achievement[0].name");
    assert!(errs[0].message.starts_with("invalid TOML"));

    // A key written twice in the second rule.
    let text = format!(
        "{RULE}\n{}",
        RULE.replace("name = \"R\"\n", "name = \"R\"\nname = \"S\"\n")
    );
    let errs = errors(&text);
    assert_eq!(errs.len(), 1, "{}", ConfigErrors(errs.clone()));
    assert_eq!(errs[0].line, 12);
    assert_eq!(errs[0].field, "achievement[1].name");
}

#[test]
fn keys_the_measure_has_no_use_for_are_errors() {
    let with = |extra: &str| {
        RULE.replace(
            "window = \"lifetime\"\n",
            &format!("window = \"lifetime\"\n{extra}\n"),
        )
    };
    // The extra key is on line 7 of the edited rule.
    for (extra, field, needle) in [
        (
            "key = \"data.zone\"",
            "key",
            "`key` is only used with measure `distinct`, not `count`",
        ),
        (
            "value = \"data.amount\"",
            "value",
            "`value` is only used with measure `sum`, `max` or `min`",
        ),
        (
            "every = \"day\"",
            "every",
            "`every` is only used with measure `streak`",
        ),
        (
            "allow_gaps = 1",
            "allow_gaps",
            "`allow_gaps` is only used with measure `streak`",
        ),
        (
            "within = \"2h\"",
            "within",
            "`within` is only used with measure `sequence`",
        ),
        (
            "steps = [ { on = [\"a\"] } ]",
            "steps",
            "`steps` are only used with measure `sequence`",
        ),
    ] {
        expect_only_error(&with(extra), 7, &format!("achievement[0].{field}"), needle);
    }
}
