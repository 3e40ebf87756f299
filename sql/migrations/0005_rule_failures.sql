-- SQL rules the engine disabled because they failed (an error, a resource limit, their
-- engine-time budget), with the definition that failed: a restart loads that definition
-- disabled, with its reason, instead of running it into the same failure again. A rule
-- replaced with another definition runs again.
CREATE TABLE rule_failures (
    rule_id    text PRIMARY KEY,
    definition jsonb NOT NULL,
    reason     text NOT NULL,
    failed_at  timestamptz NOT NULL DEFAULT now()
);
