-- Tenancy entities, the change log other instances poll, and the spend log.
-- Times are BIGINT microseconds since the Unix epoch; documents and tag lists are JSON text.

CREATE TABLE sluice_entities (
    kind TEXT NOT NULL,
    id TEXT NOT NULL,
    spend REAL NOT NULL DEFAULT 0,
    doc TEXT NOT NULL,
    updated_at BIGINT NOT NULL,
    PRIMARY KEY (kind, id)
);

CREATE TABLE sluice_changes (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    kind TEXT NOT NULL,
    id TEXT NOT NULL,
    at BIGINT NOT NULL
);

CREATE TABLE sluice_spend_logs (
    request_id TEXT NOT NULL PRIMARY KEY,
    call_type TEXT NOT NULL,
    api_key TEXT NOT NULL,
    spend REAL NOT NULL,
    prompt_tokens BIGINT NOT NULL,
    completion_tokens BIGINT NOT NULL,
    total_tokens BIGINT NOT NULL,
    start_time BIGINT NOT NULL,
    end_time BIGINT NOT NULL,
    completion_start_time BIGINT,
    model TEXT NOT NULL,
    model_id TEXT NOT NULL,
    model_group TEXT NOT NULL,
    custom_llm_provider TEXT NOT NULL,
    api_base TEXT NOT NULL,
    user_id TEXT,
    team_id TEXT,
    end_user TEXT,
    status TEXT NOT NULL,
    status_code INTEGER NOT NULL,
    request_tags TEXT NOT NULL
);

CREATE INDEX sluice_spend_logs_start_time ON sluice_spend_logs (start_time);
CREATE INDEX sluice_spend_logs_api_key ON sluice_spend_logs (api_key, start_time);
CREATE INDEX sluice_spend_logs_user_id ON sluice_spend_logs (user_id, start_time);
CREATE INDEX sluice_spend_logs_team_id ON sluice_spend_logs (team_id, start_time);
CREATE INDEX sluice_spend_logs_end_user ON sluice_spend_logs (end_user, start_time);
