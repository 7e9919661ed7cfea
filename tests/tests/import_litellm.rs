//! Black-box tests of `sluice import-litellm`: a Postgres database shaped like LiteLLM's (the
//! tables, column types and defaults Prisma creates) is imported into a gateway's SQLite store,
//! and the gateway then honours the old LiteLLM keys and answers the imported rows.

use std::ffi::OsStr;
use std::path::Path;
use std::process::Output;
use std::time::Duration;

use serde_json::{json, Value};
use sluice_tests::{client, run_sluice, Gateway, Mock, TestDatabase};

const MASTER: &str = "sk-master-test";
const IMPORT_TIMEOUT: Duration = Duration::from_secs(60);

/// The LiteLLM tables the import reads, as Prisma's migrations create them (a subset of the
/// columns, with their real types: TEXT[] lists, JSONB, TIMESTAMP(3), DOUBLE PRECISION, BIGINT).
const REQUIRED_TABLES: &str = r#"
CREATE TABLE "LiteLLM_UserTable" (
    "user_id" TEXT NOT NULL PRIMARY KEY,
    "user_alias" TEXT,
    "team_id" TEXT,
    "sso_user_id" TEXT,
    "organization_id" TEXT,
    "password" TEXT,
    "teams" TEXT[] DEFAULT ARRAY[]::TEXT[],
    "user_role" TEXT,
    "max_budget" DOUBLE PRECISION,
    "spend" DOUBLE PRECISION NOT NULL DEFAULT 0.0,
    "user_email" TEXT,
    "models" TEXT[],
    "metadata" JSONB NOT NULL DEFAULT '{}',
    "max_parallel_requests" INTEGER,
    "tpm_limit" BIGINT,
    "rpm_limit" BIGINT,
    "budget_duration" TEXT,
    "budget_reset_at" TIMESTAMP(3),
    "allowed_cache_controls" TEXT[] DEFAULT ARRAY[]::TEXT[],
    "model_spend" JSONB NOT NULL DEFAULT '{}',
    "model_max_budget" JSONB NOT NULL DEFAULT '{}',
    "created_at" TIMESTAMP(3) DEFAULT CURRENT_TIMESTAMP,
    "updated_at" TIMESTAMP(3) DEFAULT CURRENT_TIMESTAMP
);
CREATE TABLE "LiteLLM_TeamTable" (
    "team_id" TEXT NOT NULL PRIMARY KEY,
    "team_alias" TEXT,
    "organization_id" TEXT,
    "admins" TEXT[],
    "members" TEXT[],
    "members_with_roles" JSONB NOT NULL DEFAULT '{}',
    "metadata" JSONB NOT NULL DEFAULT '{}',
    "max_budget" DOUBLE PRECISION,
    "soft_budget" DOUBLE PRECISION,
    "spend" DOUBLE PRECISION NOT NULL DEFAULT 0.0,
    "models" TEXT[],
    "max_parallel_requests" INTEGER,
    "tpm_limit" BIGINT,
    "rpm_limit" BIGINT,
    "budget_duration" TEXT,
    "budget_reset_at" TIMESTAMP(3),
    "blocked" BOOLEAN NOT NULL DEFAULT false,
    "created_at" TIMESTAMP(3) NOT NULL DEFAULT CURRENT_TIMESTAMP,
    "updated_at" TIMESTAMP(3) NOT NULL DEFAULT CURRENT_TIMESTAMP,
    "model_spend" JSONB NOT NULL DEFAULT '{}',
    "model_max_budget" JSONB NOT NULL DEFAULT '{}',
    "model_id" INTEGER
);
CREATE TABLE "LiteLLM_VerificationToken" (
    "token" TEXT NOT NULL PRIMARY KEY,
    "key_name" TEXT,
    "key_alias" TEXT,
    "soft_budget_cooldown" BOOLEAN NOT NULL DEFAULT false,
    "spend" DOUBLE PRECISION NOT NULL DEFAULT 0.0,
    "expires" TIMESTAMP(3),
    "models" TEXT[],
    "aliases" JSONB NOT NULL DEFAULT '{}',
    "config" JSONB NOT NULL DEFAULT '{}',
    "user_id" TEXT,
    "team_id" TEXT,
    "permissions" JSONB NOT NULL DEFAULT '{}',
    "max_parallel_requests" INTEGER,
    "metadata" JSONB NOT NULL DEFAULT '{}',
    "blocked" BOOLEAN,
    "tpm_limit" BIGINT,
    "rpm_limit" BIGINT,
    "max_budget" DOUBLE PRECISION,
    "budget_duration" TEXT,
    "budget_reset_at" TIMESTAMP(3),
    "allowed_cache_controls" TEXT[] DEFAULT ARRAY[]::TEXT[],
    "allowed_routes" TEXT[] DEFAULT ARRAY[]::TEXT[],
    "model_spend" JSONB NOT NULL DEFAULT '{}',
    "model_max_budget" JSONB NOT NULL DEFAULT '{}',
    "budget_id" TEXT,
    "organization_id" TEXT,
    "created_at" TIMESTAMP(3) DEFAULT CURRENT_TIMESTAMP,
    "created_by" TEXT,
    "updated_at" TIMESTAMP(3) DEFAULT CURRENT_TIMESTAMP,
    "updated_by" TEXT
);
"#;

const OPTIONAL_TABLES: &str = r#"
CREATE TABLE "LiteLLM_BudgetTable" (
    "budget_id" TEXT NOT NULL PRIMARY KEY,
    "max_budget" DOUBLE PRECISION,
    "soft_budget" DOUBLE PRECISION,
    "max_parallel_requests" INTEGER,
    "tpm_limit" BIGINT,
    "rpm_limit" BIGINT,
    "model_max_budget" JSONB,
    "budget_duration" TEXT,
    "budget_reset_at" TIMESTAMP(3),
    "allowed_models" TEXT[] DEFAULT ARRAY[]::TEXT[],
    "created_at" TIMESTAMP(3) NOT NULL DEFAULT CURRENT_TIMESTAMP,
    "created_by" TEXT NOT NULL,
    "updated_at" TIMESTAMP(3) NOT NULL DEFAULT CURRENT_TIMESTAMP,
    "updated_by" TEXT NOT NULL
);
CREATE TABLE "LiteLLM_TeamMembership" (
    "user_id" TEXT NOT NULL,
    "team_id" TEXT NOT NULL,
    "spend" DOUBLE PRECISION NOT NULL DEFAULT 0.0,
    "budget_id" TEXT,
    CONSTRAINT "LiteLLM_TeamMembership_pkey" PRIMARY KEY ("user_id", "team_id")
);
CREATE TABLE "LiteLLM_EndUserTable" (
    "user_id" TEXT NOT NULL PRIMARY KEY,
    "alias" TEXT,
    "spend" DOUBLE PRECISION NOT NULL DEFAULT 0.0,
    "allowed_model_region" TEXT,
    "default_model" TEXT,
    "budget_id" TEXT,
    "blocked" BOOLEAN NOT NULL DEFAULT false
);
"#;

fn sha256_hex(s: &str) -> String {
    use sha2::{Digest, Sha256};
    Sha256::digest(s.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A UTC `TIMESTAMP(3)` `days` from now, as Prisma writes them.
fn utc_in_days(days: i64) -> String {
    format!("((now() AT TIME ZONE 'UTC') + interval '{days} days')::timestamp(3)")
}

/// LiteLLM rows: a budget, a user, a team with an admin in `members_with_roles`, a membership
/// of the user in the team (only in `LiteLLM_TeamMembership`), an end user, and keys: the one
/// in use, a blocked one, an expired one and one whose `rpm_limit` no gateway can honour.
fn seed(db: &TestDatabase) {
    let old = sha256_hex("sk-litellm-old");
    let blocked = sha256_hex("sk-litellm-blocked");
    let expired = sha256_hex("sk-litellm-expired");
    let bad = sha256_hex("sk-litellm-bad");
    let future = utc_in_days(20);
    let past = utc_in_days(-1);
    db.query(&format!(
        r#"
INSERT INTO "LiteLLM_BudgetTable" (budget_id, max_budget, rpm_limit, tpm_limit, budget_duration,
    budget_reset_at, model_max_budget, created_by, updated_by)
VALUES ('b-litellm', 100.0, 50, 5000, '30d', {future}, NULL, 'admin', 'admin');

INSERT INTO "LiteLLM_UserTable" (user_id, user_alias, user_email, user_role, password, models,
    spend, max_budget, metadata)
VALUES ('u-litellm', 'Ursula', 'ursula@example.com', 'internal_user', 'hashed-ui-password',
    '{{}}', 1.25, 50.0, '{{"dept": "research"}}');

INSERT INTO "LiteLLM_TeamTable" (team_id, team_alias, admins, members, members_with_roles,
    models, spend, max_budget, tpm_limit, rpm_limit, budget_duration, budget_reset_at)
VALUES ('t-litellm', 'legacy-team', '{{u-admin}}', '{{}}',
    '[{{"role": "admin", "user_id": "u-admin", "user_email": null}}]', '{{m}}', 2.5, 40.0,
    NULL, 1000, '30d', {future});

INSERT INTO "LiteLLM_TeamMembership" (user_id, team_id, spend, budget_id)
VALUES ('u-litellm', 't-litellm', 0.5, 'b-litellm');

INSERT INTO "LiteLLM_EndUserTable" (user_id, alias, spend, blocked, budget_id, default_model)
VALUES ('c-litellm', 'acme', 0.75, false, 'b-litellm', 'm');

INSERT INTO "LiteLLM_VerificationToken" (token, key_name, key_alias, spend, expires, models,
    aliases, config, user_id, team_id, metadata, blocked, tpm_limit, rpm_limit, max_budget,
    budget_duration, budget_reset_at, allowed_routes, model_spend, model_max_budget, budget_id,
    created_by)
VALUES
    ('{old}', 'sk-...-old', 'old-key', 3.5, {future}, '{{m}}', '{{}}', '{{}}', 'u-litellm',
     't-litellm', '{{"owner": "ops"}}', NULL, 100000, 100, 10.0, '30d', {future},
     '{{llm_api_routes,info_routes}}', '{{"m": 1.5}}',
     '{{"m": {{"budget_limit": "5", "time_period": "30d"}}}}', 'b-litellm', 'u-litellm'),
    ('{blocked}', 'sk-...cked', 'blocked-key', 0, NULL, '{{m}}', '{{}}', '{{}}', NULL, NULL,
     '{{}}', true, NULL, NULL, NULL, NULL, NULL, '{{}}', '{{}}', '{{}}', NULL, NULL),
    ('{expired}', 'sk-...ired', 'expired-key', 0, {past}, NULL, '{{}}', '{{}}', NULL, NULL,
     '{{}}', false, NULL, NULL, NULL, NULL, NULL, '{{}}', '{{}}', '{{}}', NULL, NULL),
    ('{bad}', 'sk-...-bad', 'bad-key', 0, NULL, NULL, '{{}}', '{{}}', NULL, NULL,
     '{{}}', false, NULL, -5, NULL, NULL, NULL, '{{}}', '{{}}', '{{}}', NULL, NULL);
"#
    ));
}

/// Groups `m` (priced echo) and `m2`; the store is the SQLite file `db_path`.
fn config(mock: &Mock, db_path: &Path) -> String {
    let base = mock.base_url();
    format!(
        "model_list:
  - {{model_name: m, litellm_params: {{model: openai/echo, api_base: {base}, input_cost_per_token: 0.001, output_cost_per_token: 0.002}}}}
  - {{model_name: m2, litellm_params: {{model: openai/echo2, api_base: {base}}}}}
general_settings:
  master_key: {MASTER}
  proxy_batch_write_at: 0.1
  database_url: \"sqlite://{}?mode=rwc\"
",
        db_path.display()
    )
}

async fn import(args: &[&OsStr], cwd: &Path) -> Output {
    let mut all: Vec<&OsStr> = vec![OsStr::new("import-litellm")];
    all.extend_from_slice(args);
    // The target comes from the config given here, never from the test's environment.
    run_sluice(&all, &[("DATABASE_URL", "")], cwd, IMPORT_TIMEOUT).await
}

fn text(out: &[u8]) -> String {
    String::from_utf8_lossy(out).into_owned()
}

/// The `  NAME  N` count lines of an import report.
fn counts(stdout: &str) -> Vec<(String, u64)> {
    stdout
        .lines()
        .filter(|l| l.starts_with("  "))
        .filter_map(|l| {
            let (name, n) = l.trim().rsplit_once(' ')?;
            Some((name.trim().to_string(), n.parse().ok()?))
        })
        .collect()
}

async fn call(
    gw: &Gateway,
    method: &str,
    path: &str,
    key: &str,
    body: Option<Value>,
) -> (u16, Value) {
    let mut req = client()
        .request(method.parse().unwrap(), gw.url(path))
        .bearer_auth(key);
    if let Some(b) = body {
        req = req.json(&b);
    }
    let resp = req.send().await.expect("request to the gateway");
    let status = resp.status().as_u16();
    let text = resp.text().await.unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

async fn get(gw: &Gateway, path: &str) -> Value {
    let (status, v) = call(gw, "GET", path, MASTER, None).await;
    assert_eq!(status, 200, "{path}: {v}\n{}", gw.log());
    v
}

async fn chat(gw: &Gateway, key: &str, model: &str) -> (u16, Value) {
    let body = json!({"model": model, "messages": [{"role": "user", "content": "hello there"}]});
    call(gw, "POST", "/v1/chat/completions", key, Some(body)).await
}

#[tokio::test]
async fn litellm_keys_keep_working_after_import() {
    let source = TestDatabase::create();
    source.query(REQUIRED_TABLES);
    source.query(OPTIONAL_TABLES);
    seed(&source);

    let mock = Mock::start("import").await;
    let dir = tempfile::tempdir().unwrap();
    let config_yaml = config(&mock, &dir.path().join("sluice.db"));
    let config_path = dir.path().join("config.yaml");
    std::fs::write(&config_path, &config_yaml).unwrap();
    let args = [
        OsStr::new("--database-url"),
        OsStr::new(&source.url),
        OsStr::new("--config"),
        config_path.as_os_str(),
    ];

    let first = import(&args, dir.path()).await;
    let stdout = text(&first.stdout);
    assert!(
        first.status.success(),
        "stdout:\n{stdout}\nstderr:\n{}",
        text(&first.stderr)
    );
    let expected: Vec<(String, u64)> = [
        ("keys", 3),
        ("users", 1),
        ("teams", 1),
        ("team memberships", 1),
        ("budgets", 1),
        ("end users", 1),
        ("key model spend", 1),
    ]
    .iter()
    .map(|(k, n)| (k.to_string(), *n))
    .collect();
    assert_eq!(counts(&stdout), expected, "{stdout}");
    // The key whose rpm_limit cannot be honoured is named, with the reason, and skipped.
    let bad = sha256_hex("sk-litellm-bad");
    assert!(
        stdout.contains("skipped 1 row(s):")
            && stdout.contains(&format!("LiteLLM_VerificationToken {bad}: "))
            && stdout.contains("rpm_limit"),
        "{stdout}"
    );
    assert!(!stdout.contains("not found"), "{stdout}");

    // Again: the same rows are updated in place, not added twice.
    let second = import(&args, dir.path()).await;
    assert!(second.status.success(), "{}", text(&second.stderr));
    assert_eq!(text(&second.stdout), stdout);

    let gw = Gateway::start(&config_yaml, &[]).await;

    // The imported key, its limits and its spend.
    let old = sha256_hex("sk-litellm-old");
    let info = get(&gw, "/key/info?key=sk-litellm-old").await;
    let k = &info["info"];
    assert_eq!(k["token"], old, "{info}");
    assert_eq!(k["key_alias"], "old-key");
    assert_eq!(k["spend"], 3.5);
    assert_eq!(k["max_budget"], 10.0);
    assert_eq!(k["rpm_limit"], 100);
    assert_eq!(k["tpm_limit"], 100000);
    assert_eq!(k["models"], json!(["m"]));
    assert_eq!(
        k["allowed_routes"],
        json!(["llm_api_routes", "info_routes"])
    );
    assert_eq!(k["metadata"]["owner"], "ops");
    assert_eq!(k["budget_id"], "b-litellm");
    assert_eq!(k["model_max_budget"]["m"]["budget_limit"], 5.0);
    let expires = k["expires"].as_str().expect("expires");
    assert!(expires.ends_with('Z'), "{expires}");
    assert!(k.get("model_spend").is_none(), "{info}");
    let (_, list) = call(&gw, "GET", "/key/list", MASTER, None).await;
    assert_eq!(list["total_count"], 3, "{list}");

    // The user, with the membership folded into its teams and no password.
    let user = get(&gw, "/user/info?user_id=u-litellm").await;
    let u = &user["user_info"];
    assert_eq!(u["user_email"], "ursula@example.com", "{user}");
    assert_eq!(u["user_role"], "internal_user");
    assert_eq!(u["spend"], 1.25);
    assert_eq!(u["max_budget"], 50.0);
    assert_eq!(u["teams"], json!(["t-litellm"]));
    assert_eq!(u["metadata"]["dept"], "research");
    assert!(u.get("password").is_none(), "{user}");
    assert_eq!(user["keys"].as_array().map(Vec::len), Some(1), "{user}");

    // The team, with the membership folded into members_with_roles.
    let team = get(&gw, "/team/info?team_id=t-litellm").await;
    let t = &team["team_info"];
    assert_eq!(t["team_alias"], "legacy-team", "{team}");
    assert_eq!(t["spend"], 2.5);
    assert_eq!(t["max_budget"], 40.0);
    assert_eq!(t["rpm_limit"], 1000);
    assert_eq!(t["models"], json!(["m"]));
    assert_eq!(
        t["members_with_roles"],
        json!([
            {"role": "admin", "user_id": "u-admin"},
            {"role": "user", "user_id": "u-litellm", "budget_id": "b-litellm"},
        ]),
        "{team}"
    );
    let reset_at = t["budget_reset_at"].as_str().expect("budget_reset_at");
    assert!(reset_at.ends_with('Z'), "{team}");

    // The budget and the end user.
    let budgets = get(&gw, "/budget/info?budget_id=b-litellm").await;
    assert_eq!(budgets[0]["budget_id"], "b-litellm", "{budgets}");
    assert_eq!(budgets[0]["max_budget"], 100.0);
    assert_eq!(budgets[0]["rpm_limit"], 50);
    assert_eq!(budgets[0]["tpm_limit"], 5000);
    assert_eq!(budgets[0]["budget_duration"], "30d");
    let customer = get(&gw, "/customer/info?end_user_id=c-litellm").await;
    assert_eq!(customer["user_id"], "c-litellm", "{customer}");
    assert_eq!(customer["alias"], "acme");
    assert_eq!(customer["spend"], 0.75);
    assert_eq!(customer["budget_id"], "b-litellm");
    assert_eq!(customer["default_model"], "m");

    // The old LiteLLM key works for its model, and only for it.
    let (status, v) = chat(&gw, "sk-litellm-old", "m").await;
    assert_eq!(status, 200, "{v}\n{}", gw.log());
    let (status, v) = chat(&gw, "sk-litellm-old", "m2").await;
    assert_eq!(status, 401, "{v}");
    // It reads its own info, as its allowed_routes say; its spend goes on from LiteLLM's.
    let (status, v) = call(&gw, "GET", "/key/info", "sk-litellm-old", None).await;
    assert_eq!(status, 200, "{v}");
    let spend = v["info"]["spend"].as_f64().unwrap();
    assert!(spend > 3.5 && spend < 4.0, "{v}");

    // Blocked, expired and skipped keys are refused.
    let (status, v) = chat(&gw, "sk-litellm-blocked", "m").await;
    assert_eq!(status, 403, "{v}");
    let (status, v) = chat(&gw, "sk-litellm-expired", "m").await;
    assert_eq!(status, 401, "{v}");
    assert_eq!(v["error"]["type"], "expired_key", "{v}");
    let (status, v) = chat(&gw, "sk-litellm-bad", "m").await;
    assert_eq!(status, 401, "{v}");
}

#[tokio::test]
async fn optional_tables_may_be_missing() {
    let source = TestDatabase::create();
    source.query(REQUIRED_TABLES);
    let key = sha256_hex("sk-litellm-only");
    source.query(&format!(
        r#"INSERT INTO "LiteLLM_VerificationToken" (token, key_alias) VALUES ('{key}', 'only')"#
    ));
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("sluice.db");
    std::fs::write(
        dir.path().join("config.yaml"),
        format!(
            "general_settings:\n  database_url: \"sqlite://{}?mode=rwc\"\n",
            db.display()
        ),
    )
    .unwrap();
    let out = import(
        &[
            OsStr::new("--database-url"),
            OsStr::new(&source.url),
            OsStr::new("--config"),
            dir.path().join("config.yaml").as_os_str(),
        ],
        dir.path(),
    )
    .await;
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", text(&out.stderr));
    assert!(
        counts(&stdout).contains(&("keys".to_string(), 1)),
        "{stdout}"
    );
    for table in [
        "LiteLLM_BudgetTable",
        "LiteLLM_TeamMembership",
        "LiteLLM_EndUserTable",
    ] {
        assert!(
            stdout.contains(&format!("table \"{table}\" not found")),
            "{stdout}"
        );
    }
    assert!(db.exists());
}

#[tokio::test]
async fn unreachable_source_exits_1_without_creating_a_store() {
    let dir = tempfile::tempdir().unwrap();
    // No --config: the target would be sluice.db in the working directory.
    let out = import(
        &[
            OsStr::new("--database-url"),
            OsStr::new("postgres://litellm:hunter2@127.0.0.1:1/litellm"),
        ],
        dir.path(),
    )
    .await;
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("cannot connect to the LiteLLM database"),
        "{stderr}"
    );
    assert!(
        stderr.contains("postgres://litellm:***@127.0.0.1:1/litellm"),
        "{stderr}"
    );
    assert!(!stderr.contains("hunter2"), "{stderr}");
    assert!(!dir.path().join("sluice.db").exists());

    // A database without LiteLLM's tables is refused with a hint, also with exit code 1.
    let empty = TestDatabase::create();
    let out = import(
        &[OsStr::new("--database-url"), OsStr::new(&empty.url)],
        dir.path(),
    )
    .await;
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("not found: is this LiteLLM's database"),
        "{stderr}"
    );
    assert!(!dir.path().join("sluice.db").exists());
}
