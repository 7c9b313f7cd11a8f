//! Loading a site's rule files: glob expansion relative to the config
//! folder, order, and ids unique across files.

use std::path::{Path, PathBuf};

use edge_config::{load_rules, load_site_config, ConfigErrors, RuleBundle, SiteConfig};

fn rule(id: &str) -> String {
    format!(
        "[[achievement]]\nid = \"{id}\"\nname = \"{id}\"\non = [\"fan.cheer\"]\nmeasure = \"count\"\nwindow = \"lifetime\"\ntiers = [ {{ at = 1 }} ]\n"
    )
}

struct Site {
    dir: tempfile::TempDir,
}

impl Site {
    fn new() -> Site {
        Site {
            dir: tempfile::tempdir().expect("temp dir"),
        }
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    fn write(&self, rel: &str, text: &str) {
        let path = self.path(rel);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    }

    /// Writes `conf/site.toml` with these rule patterns and loads it.
    fn config(&self, patterns: &[&str]) -> SiteConfig {
        let list: Vec<String> = patterns.iter().map(|p| format!("{p:?}")).collect();
        self.write(
            "conf/site.toml",
            &format!(
                "[site]\nid = \"s\"\ndata_dir = \"data\"\nrules = [\n  {}\n]\n",
                list.join(",\n  ")
            ),
        );
        load_site_config(&self.path("conf/site.toml")).expect("valid site config")
    }

    fn load(&self, patterns: &[&str]) -> Result<RuleBundle, ConfigErrors> {
        load_rules(&self.config(patterns))
    }
}

fn ids(bundle: &RuleBundle) -> Vec<&str> {
    bundle.achievements.iter().map(|r| r.id.as_str()).collect()
}

#[test]
fn patterns_expand_relative_to_the_config_folder_in_sorted_order() {
    let site = Site::new();
    site.write("conf/rules/b.toml", &rule("b"));
    site.write("conf/rules/a.toml", &(rule("a1") + "\n" + &rule("a2")));
    site.write("conf/rules/notes.txt", "not a rule file");
    site.write("conf/rules/.#a.toml", "lock file: not valid TOML {");
    site.write("conf/rules/sub/deeper.toml", &rule("deep"));
    std::fs::create_dir_all(site.path("conf/rules/dir.toml")).unwrap();
    site.write("conf/extra.toml", &rule("extra"));

    let bundle = site
        .load(&["rules/*.toml", "extra.toml", "rules/a.toml"])
        .expect("valid rules");
    assert_eq!(ids(&bundle), ["a1", "a2", "b", "extra"]);
    assert_eq!(
        bundle.files,
        [
            site.path("conf/rules/a.toml"),
            site.path("conf/rules/b.toml"),
            site.path("conf/extra.toml"),
        ]
    );
    assert_eq!(bundle.achievements[2].file, site.path("conf/rules/b.toml"));
    assert_eq!(bundle.achievements[1].line, 9);

    let bundle = site.load(&["rules/**/*.toml"]).expect("valid rules");
    assert_eq!(ids(&bundle), ["a1", "a2", "b", "deep"]);

    let absolute = site.path("conf/rules/b.toml");
    let bundle = site
        .load(&[absolute.to_str().unwrap()])
        .expect("valid rules");
    assert_eq!(ids(&bundle), ["b"]);
}

#[test]
fn no_patterns_no_rules() {
    let site = Site::new();
    let bundle = site.load(&[]).expect("valid");
    assert_eq!(bundle, RuleBundle::default());
}

#[test]
fn a_pattern_matching_nothing_is_an_error_at_the_pattern() {
    let site = Site::new();
    site.write("conf/rules/a.toml", &rule("a"));
    let err = site
        .load(&["rules/*.toml", "rulez/*.toml"])
        .expect_err("typo in pattern");
    assert_eq!(err.0.len(), 1, "{err}");
    let d = &err.0[0];
    assert_eq!(d.file, site.path("conf/site.toml"));
    assert_eq!((d.line, d.column), (6, 3));
    assert_eq!(d.field, "site.rules[1]");
    assert!(
        d.message.contains("`rulez/*.toml` matches no file"),
        "{}",
        d.message
    );
    assert!(
        d.message.contains(&site.path("conf").display().to_string()),
        "{}",
        d.message
    );
    // Directories don't count as matches.
    std::fs::create_dir_all(site.path("conf/only-dirs/x.toml")).unwrap();
    let err = site.load(&["only-dirs/*.toml"]).expect_err("no files");
    assert_eq!(err.0[0].field, "site.rules[0]");
}

#[test]
fn ids_must_be_unique_across_files() {
    let site = Site::new();
    site.write("conf/rules/a.toml", &rule("same"));
    site.write("conf/rules/b.toml", &(rule("other") + "\n" + &rule("same")));
    let err = site.load(&["rules/*.toml"]).expect_err("duplicate id");
    assert_eq!(err.0.len(), 1, "{err}");
    let d = &err.0[0];
    assert_eq!(d.file, site.path("conf/rules/b.toml"));
    assert_eq!((d.line, d.column), (10, 6));
    assert_eq!(d.field, "achievement[1].id");
    assert_eq!(
        d.message,
        format!(
            "duplicate id `same`: already defined at {}:1",
            site.path("conf/rules/a.toml").display()
        )
    );
}

#[test]
fn errors_from_every_file_are_collected() {
    let site = Site::new();
    site.write("conf/rules/a.toml", &rule("a b"));
    site.write("conf/rules/b.toml", "[[achievement]]\nid = ");
    site.write("conf/rules/c.toml", &rule("c").replace("count", "average"));
    let err = site
        .load(&["rules/*.toml", "missing.toml"])
        .expect_err("broken files");
    let got: Vec<(PathBuf, &str)> = err
        .0
        .iter()
        .map(|d| (d.file.clone(), d.field.as_str()))
        .collect();
    assert_eq!(
        got,
        [
            (site.path("conf/site.toml"), "site.rules[1]"),
            (site.path("conf/rules/a.toml"), "achievement[0].id"),
            (site.path("conf/rules/b.toml"), "achievement[0].id"),
            (site.path("conf/rules/c.toml"), "achievement[0].measure"),
        ],
        "{err}"
    );
    // One line per diagnostic, each naming its file.
    let shown = err.to_string();
    assert_eq!(shown.lines().count(), 4);
    assert!(shown
        .lines()
        .all(|l| l.starts_with(&site.dir.path().display().to_string())));
}

#[test]
fn unreadable_rule_files_are_reported() {
    let site = Site::new();
    site.write("conf/rules/a.toml", &rule("a"));
    std::fs::write(site.path("conf/rules/b.toml"), b"\xff\xfe").unwrap();
    let err = site.load(&["rules/*.toml"]).expect_err("not UTF-8");
    assert_eq!(err.0.len(), 1, "{err}");
    assert_eq!(err.0[0].file, site.path("conf/rules/b.toml"));
    assert_eq!(err.0[0].field, "file");
    assert!(err.0[0].message.contains("not UTF-8"));
}

#[test]
fn glob_metacharacters_in_the_config_folder_are_literal() {
    let site = Site::new();
    site.write("we[ir]d/rules/a.toml", &rule("a"));
    site.write(
        "we[ir]d/site.toml",
        "[site]\nid = \"s\"\ndata_dir = \"data\"\nrules = [\"rules/*.toml\"]\n",
    );
    let config = load_site_config(&site.path("we[ir]d/site.toml")).expect("valid");
    let bundle = load_rules(&config).expect("valid");
    assert_eq!(ids(&bundle), ["a"]);
    let _: &Path = bundle.files[0].as_path();
}

#[test]
fn the_recorded_sources_rebuild_the_same_bundle_without_the_files() {
    let site = Site::new();
    site.write("conf/rules/a.toml", &rule("a"));
    site.write(
        "conf/rules/b.toml",
        &format!(
            "{}\n[[voucher_pool]]\nid = \"p\"\ncodes = \"codes.txt\"\n",
            rule("b")
        ),
    );
    site.write("conf/rules/codes.txt", "ONE\nTWO\n");
    let loaded = site.load(&["rules/*.toml"]).expect("valid rules");
    assert_eq!(loaded.sources.len(), 2);

    // The files change or go; the recorded texts still give the bundle.
    std::fs::remove_dir_all(site.path("conf/rules")).unwrap();
    let sources = loaded
        .files
        .iter()
        .cloned()
        .zip(loaded.sources.iter().cloned())
        .collect();
    let rebuilt = edge_config::rules_from_sources(sources, loaded.timezone).expect("rebuilt");
    assert_eq!(rebuilt, loaded);
}
