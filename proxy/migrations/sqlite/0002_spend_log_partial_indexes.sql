-- The spend log's user, team and end-user indexes only serve lookups by one of those ids, never
-- rows where it is NULL (a key without a user or team, a request without an end user). As
-- partial indexes they skip those rows: each spend row written updates up to three fewer
-- indexes. `WHERE user_id = $1` implies `user_id IS NOT NULL`, so the queries still use them.

DROP INDEX sluice_spend_logs_user_id;
DROP INDEX sluice_spend_logs_team_id;
DROP INDEX sluice_spend_logs_end_user;
CREATE INDEX sluice_spend_logs_user_id ON sluice_spend_logs (user_id, start_time)
    WHERE user_id IS NOT NULL;
CREATE INDEX sluice_spend_logs_team_id ON sluice_spend_logs (team_id, start_time)
    WHERE team_id IS NOT NULL;
CREATE INDEX sluice_spend_logs_end_user ON sluice_spend_logs (end_user, start_time)
    WHERE end_user IS NOT NULL;
