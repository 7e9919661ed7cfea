use super::*;
use std::time::Duration;

fn parse(text: &str) -> Result<Config, ConfigError> {
    parse_config(text, Path::new("test.yaml"))
}

#[test]
fn parses_litellm_config_with_defaults() {
    std::env::set_var("SLUICE_CFG_TEST_KEY", "sk-live-1234567890");
    let c = parse(
        r#"
model_list:
  - model_name: gpt-4o
    litellm_params:
      model: openai/gpt-4o
      api_key: os.environ/SLUICE_CFG_TEST_KEY
      rpm: "100"
      extra_headers: {x-team: a}
      temperature: 0.2
  - model_name: gpt-4o
    litellm_params:
      model: hosted_vllm/meta-llama/Llama-3-8B
      api_base: http://127.0.0.1:8000/v1/
      weight: 3
      order: 2
    model_info:
      id: vllm-1
      mode: chat
      version: 7
router_settings:
  routing_strategy: least-busy
  model_group_alias: {"gpt4": "gpt-4o", "secret": {"model": "gpt-4o", "hidden": true}}
litellm_settings:
  num_retries: 4
  fallbacks: [{"gpt-4o": ["gpt-4o"]}]
  request_timeout: 30
general_settings:
  master_key: sk-master
"#,
    )
    .unwrap();
    assert_eq!(c.deployments.len(), 2);
    let d0 = &c.deployments[0];
    assert_eq!(d0.api_key.as_deref(), Some("sk-live-1234567890"));
    assert_eq!(d0.api_base.as_deref(), Some("https://api.openai.com/v1"));
    assert_eq!(d0.rpm, Some(100));
    assert_eq!(d0.default_params["temperature"], 0.2);
    assert_eq!(d0.extra_headers, vec![("x-team".into(), "a".into())]);
    let d1 = &c.deployments[1];
    assert_eq!(d1.id, "vllm-1");
    assert_eq!(d1.api_base.as_deref(), Some("http://127.0.0.1:8000/v1"));
    assert_eq!(d1.server_root().as_deref(), Some("http://127.0.0.1:8000"));
    assert_eq!(d1.model_info.raw["version"], 7);
    assert_eq!(c.router.routing_strategy, RoutingStrategy::LeastBusy);
    assert_eq!(c.router.num_retries, 4);
    assert_eq!(c.router.allowed_fails, 3);
    assert_eq!(c.router.cooldown_time, Duration::from_secs(5));
    assert_eq!(c.router.timeout, Duration::from_secs(30));
    assert_eq!(
        c.router.fallbacks,
        vec![("gpt-4o".into(), vec!["gpt-4o".into()])]
    );
    assert!(c.model_group_alias["secret"].hidden);
    assert_eq!(c.general.master_key.as_deref(), Some("sk-master"));
    let table = routing_table(&c);
    assert!(table.contains("****7890"), "{table}");
    assert!(!table.contains("sk-live-1234567890"), "{table}");
}

#[test]
fn reports_every_problem_with_path_and_expectation() {
    let err = parse(
        r#"
model_list:
  - model_name: a
    litellm_params:
      model: openai/x
      rpm: lots
  - model_name: b
    litellm_params:
      model: nonsense-provider-model
  - model_name: c
    litellm_params:
      model: openai/y
      api_key: os.environ/SLUICE_CFG_TEST_SURELY_UNSET
router_settings:
  routing_strategy: fastest
  fallbacks: [{"a": ["missing-group"]}]
"#,
    )
    .unwrap_err();
    let text = err.to_string();
    for needle in [
        "test.yaml",
        "model_list[0].litellm_params.rpm",
        "non-negative integer",
        "model_list[1].litellm_params.model",
        "model_list[2].litellm_params.api_key",
        "SLUICE_CFG_TEST_SURELY_UNSET",
        "router_settings.routing_strategy",
        "router_settings.fallbacks.a",
    ] {
        assert!(text.contains(needle), "missing {needle:?} in:\n{text}");
    }
    assert_eq!(err.problems.len(), 5, "{text}");
}

#[test]
fn collects_ignored_keys_and_applies_credentials_and_env() {
    let c = parse(
        r#"
environment_variables:
  SLUICE_CFG_TEST_BASE: http://10.1.2.3:9000/v1
credential_list:
  - credential_name: shared
    credential_values:
      api_key: sk-cred-abcdefgh
      api_base: os.environ/SLUICE_CFG_TEST_BASE
    credential_info: {}
model_list:
  - model_name: m
    litellm_params:
      model: hosted_vllm/m
      litellm_credential_name: shared
      mock_response: hi
litellm_settings:
  cache: true
general_settings:
  alerting: ["slack"]
guardrails: []
"#,
    )
    .unwrap();
    let d = &c.deployments[0];
    assert_eq!(d.api_key.as_deref(), Some("sk-cred-abcdefgh"));
    assert_eq!(d.api_base.as_deref(), Some("http://10.1.2.3:9000/v1"));
    for k in [
        "guardrails",
        "litellm_settings.cache",
        "general_settings.alerting",
        "model_list[0].litellm_params.mock_response",
    ] {
        assert!(
            c.ignored_keys.iter().any(|i| i == k),
            "{k}: {:?}",
            c.ignored_keys
        );
    }
}

#[test]
fn wildcards_and_organizations() {
    let c = parse(
        r#"
model_list:
  - model_name: "openai/*"
    litellm_params: {model: "openai/*", api_key: k}
  - model_name: "team-a/*"
    litellm_params: {model: "openai/*"}
  - model_name: multi
    litellm_params: {model: openai/gpt-4o, organization: [org-1, org-2]}
"#,
    )
    .unwrap();
    let w = &c.deployments[0];
    assert!(w.is_wildcard());
    assert_eq!(w.wildcard_capture("openai/gpt-4o"), Some("gpt-4o"));
    assert_eq!(w.upstream_model_for("openai/gpt-4o"), "gpt-4o");
    assert_eq!(w.wildcard_capture("groq/x"), None);
    assert_eq!(c.deployments[1].upstream_model_for("team-a/o3"), "o3");
    let orgs: Vec<_> = c.deployments[2..]
        .iter()
        .map(|d| d.organization.clone())
        .collect();
    assert_eq!(orgs, vec![Some("org-1".into()), Some("org-2".into())]);
    assert_ne!(c.deployments[2].id, c.deployments[3].id);
}

#[test]
fn supported_environments_filter_deployments() {
    // LITELLM_ENVIRONMENT is process-wide; this is the only test that sets it.
    std::env::set_var("LITELLM_ENVIRONMENT", "staging");
    let c = parse(
        r#"
model_list:
  - model_name: prod-only
    litellm_params: {model: openai/a}
    model_info: {supported_environments: [production]}
  - model_name: staging
    litellm_params: {model: openai/b}
    model_info: {supported_environments: [staging, development]}
"#,
    )
    .unwrap();
    std::env::remove_var("LITELLM_ENVIRONMENT");
    let names: Vec<_> = c
        .deployments
        .iter()
        .map(|d| d.model_name.as_str())
        .collect();
    assert_eq!(names, vec!["staging"]);
}

#[test]
fn broken_yaml_names_the_file() {
    let err = parse("model_list: [\n  - {").unwrap_err();
    assert!(err.to_string().contains("test.yaml"));
    assert!(err.to_string().contains("valid YAML"));
}

#[test]
fn embedded_default_is_a_catch_all_wildcard() {
    let c = embedded_default();
    assert_eq!(c.deployments.len(), 1);
    assert!(c.deployments[0].wildcard_capture("gpt-4o").is_some());
}

#[test]
fn local_models_become_unix_socket_deployments() {
    let dir = tempfile_dir();
    let model = dir.join("tiny.gguf");
    std::fs::write(&model, b"GGUF").unwrap();
    let text = format!(
        "local_models:\n  - model_name: tiny\n    model: {}\n    socket: {}/tiny.sock\n    args: [\"--threads\", 2]\nmodel_list:\n  - model_name: gpt-4o\n    litellm_params:\n      model: openai/gpt-4o\n",
        model.display(),
        dir.display()
    );
    let c = parse_config(&text, Path::new("c.yaml")).unwrap();
    assert_eq!(c.local_models.len(), 1);
    let local = &c.local_models[0];
    assert_eq!(local.args, vec!["--threads".to_string(), "2".to_string()]);
    assert_eq!(local.socket, dir.join("tiny.sock"));
    let d = &c.deployments[0];
    assert_eq!(d.model_name, "tiny");
    assert_eq!(d.id, "local-tiny");
    assert!(d.provider.is_hosted_vllm());
    assert_eq!(
        d.api_base.as_deref(),
        Some(format!("unix:{}/tiny.sock", dir.display()).as_str())
    );
    assert_eq!(c.deployments[1].model_name, "gpt-4o");

    // The gateway's --local-model flag adds entries to any config, the embedded one included.
    let c = parse_config_with_local_models(
        EMBEDDED_DEFAULT,
        Path::new("<built-in>"),
        &[("tiny".into(), model.clone())],
    )
    .unwrap();
    assert_eq!(c.local_models[0].model_name, "tiny");
    assert!(c.local_models[0]
        .socket
        .to_string_lossy()
        .ends_with("sluice-engine-tiny.sock"));
}

#[test]
fn local_model_problems_name_the_key() {
    let text = "local_models:\n  - model_name: x\n    model: /nonexistent/m.gguf\n    socket: relative.sock\n  - model: /tmp\n";
    let e = parse_config(text, Path::new("c.yaml"))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("local_models[0].model: expected a GGUF file"),
        "{e}"
    );
    assert!(
        e.contains("local_models[0].socket: expected an absolute path"),
        "{e}"
    );
    assert!(e.contains("local_models[1]"), "{e}");
}

fn tempfile_dir() -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("sluice-config-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}
