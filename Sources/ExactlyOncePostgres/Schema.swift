#if Postgres
/// The store's schema, version 1: four tables, one sequence and four functions in one
/// PostgreSQL schema (namespace) of their own. Docs/Postgres.md describes every column.
///
/// `{s}` stands for the (validated, quoted) schema name.
enum PostgresSchema {
    /// The version this code creates and knows.
    static let version = 1

    /// Statements that create version 1, in order (one statement each: the extended protocol
    /// takes one at a time).
    static let create: [String] = [
        """
        CREATE TABLE {s}.records (
            key text COLLATE "C" PRIMARY KEY,
            fingerprint bytea NOT NULL,
            phase smallint NOT NULL CHECK (phase IN (1, 2, 3)),
            attempts integer NOT NULL,
            token bigint NOT NULL,
            lease_expires_at bigint NOT NULL,
            outcome_status smallint,
            outcome_detail bytea,
            expires_at bigint,
            last_failure text,
            fence_scope text,
            fence_epoch bigint
        )
        """,
        "CREATE INDEX records_expiry ON {s}.records (expires_at) WHERE expires_at IS NOT NULL",
        "CREATE TABLE {s}.fences (scope text PRIMARY KEY, epoch bigint NOT NULL)",
        "CREATE TABLE {s}.state (key text PRIMARY KEY, value bytea, version bigint NOT NULL)",
        "CREATE SEQUENCE {s}.tokens AS bigint MINVALUE 1",
        // Claims a batch: checks and raises the fences of the batch's scopes, then answers each
        // request in order (kind 0 new, 1 completed, 2 in progress, 3 conflict).
        """
        CREATE FUNCTION {s}.claim(p_keys text[], p_fps bytea[], p_leases bigint[], p_scopes text[], p_epochs bigint[],
                                  p_prefetch boolean[], p_now bigint)
        RETURNS TABLE(o_kind smallint, o_token bigint, o_attempt integer, o_lease bigint, o_fp bytea,
                      o_status smallint, o_detail bytea)
        LANGUAGE plpgsql AS $$
        #variable_conflict use_variable
        DECLARE
            n integer := coalesce(array_length(p_keys, 1), 0);
            f record;
            seen bigint;
            inserted boolean;
            r {s}.records%ROWTYPE;
            granted boolean := false;
            base integer;
            same_owner boolean;
            newer boolean;
            charged boolean;
            tok bigint;
            sc text;
        BEGIN
            FOR f IN SELECT u.sc AS sc, min(u.ep) AS lo, max(u.ep) AS hi
                     FROM unnest(p_scopes, p_epochs) AS u(sc, ep) WHERE u.sc <> '' GROUP BY u.sc ORDER BY u.sc LOOP
                inserted := false;
                INSERT INTO {s}.fences AS t (scope, epoch) VALUES (f.sc, f.hi) ON CONFLICT (scope) DO NOTHING
                    RETURNING true INTO inserted;
                IF inserted IS NOT TRUE THEN
                    SELECT t.epoch INTO seen FROM {s}.fences t WHERE t.scope = f.sc FOR UPDATE;
                    IF f.lo < seen THEN
                        RAISE EXCEPTION USING ERRCODE = 'EO001',
                            MESSAGE = format('partition %s moved to epoch %s; this member holds epoch %s', f.sc, seen, f.lo);
                    END IF;
                    IF f.hi > seen THEN
                        UPDATE {s}.fences t SET epoch = f.hi WHERE t.scope = f.sc;
                    END IF;
                END IF;
            END LOOP;
            <<requests>>
            FOR i IN 1..n LOOP
                sc := nullif(p_scopes[i], '');
                LOOP
                    SELECT * INTO r FROM {s}.records t WHERE t.key = p_keys[i] FOR UPDATE;
                    IF NOT FOUND THEN
                        charged := NOT (p_prefetch[i] AND granted);
                        tok := nextval('{s}.tokens');
                        INSERT INTO {s}.records AS t (key, fingerprint, phase, attempts, token, lease_expires_at, fence_scope, fence_epoch)
                            VALUES (p_keys[i], p_fps[i], 1, CASE WHEN charged THEN 1 ELSE 0 END, tok, p_now + p_leases[i], sc,
                                    CASE WHEN sc IS NULL THEN NULL ELSE p_epochs[i] END)
                            ON CONFLICT (key) DO NOTHING;
                        IF FOUND THEN
                            granted := true;
                            RETURN QUERY SELECT 0::smallint, tok, 1, p_now + p_leases[i], NULL::bytea, NULL::smallint, NULL::bytea;
                            CONTINUE requests;
                        END IF;
                        CONTINUE;  -- lost a race with another claimant: read its row
                    END IF;
                    EXIT;
                END LOOP;
                base := r.attempts;
                same_owner := false;
                IF r.phase = 3 AND r.expires_at IS NOT NULL AND p_now >= r.expires_at THEN
                    base := 0;  -- retention ended: forget it and start afresh
                ELSIF r.fingerprint <> p_fps[i] THEN
                    RETURN QUERY SELECT 3::smallint, NULL::bigint, NULL::integer, NULL::bigint, r.fingerprint,
                        CASE WHEN r.phase = 3 THEN r.outcome_status END, CASE WHEN r.phase = 3 THEN r.outcome_detail END;
                    CONTINUE requests;
                ELSIF r.phase = 3 THEN
                    RETURN QUERY SELECT 1::smallint, NULL::bigint, NULL::integer, NULL::bigint, NULL::bytea, r.outcome_status, r.outcome_detail;
                    CONTINUE requests;
                ELSIF r.phase = 1 THEN
                    newer := false;
                    IF sc IS NOT NULL AND r.fence_scope IS NOT NULL AND sc = r.fence_scope THEN
                        newer := p_epochs[i] >= r.fence_epoch;
                        same_owner := p_epochs[i] = r.fence_epoch;
                    END IF;
                    IF p_now < r.lease_expires_at AND NOT newer THEN
                        RETURN QUERY SELECT 2::smallint, NULL::bigint, NULL::integer, r.lease_expires_at, NULL::bytea, NULL::smallint, NULL::bytea;
                        CONTINUE requests;
                    END IF;
                END IF;
                tok := nextval('{s}.tokens');
                charged := NOT (p_prefetch[i] AND granted) AND NOT same_owner;
                granted := true;
                UPDATE {s}.records t SET fingerprint = p_fps[i], phase = 1, attempts = base + CASE WHEN charged THEN 1 ELSE 0 END,
                    token = tok, lease_expires_at = p_now + p_leases[i], outcome_status = NULL, outcome_detail = NULL,
                    expires_at = NULL, last_failure = NULL, fence_scope = sc, fence_epoch = CASE WHEN sc IS NULL THEN NULL ELSE p_epochs[i] END
                    WHERE t.key = p_keys[i];
                RETURN QUERY SELECT 0::smallint, tok, CASE WHEN same_owner THEN greatest(1, base) ELSE base + 1 END,
                    p_now + p_leases[i], NULL::bytea, NULL::smallint, NULL::bytea;
            END LOOP;
        END
        $$
        """,
        // Completes claims in order, each with its key-value effect (reads checked, writes
        // applied). Stops at the first refused one. With p_all the call applies all or nothing
        // (and says which one was refused); without, the refused one's predecessors stay applied.
        """
        CREATE FUNCTION {s}.complete(p_keys text[], p_tokens bigint[], p_scopes text[], p_epochs bigint[],
                                     p_statuses smallint[], p_details bytea[], p_retention bigint, p_now bigint, p_all boolean,
                                     p_fx_owner integer[], p_fx_kind smallint[], p_fx_key text[], p_fx_value bytea[], p_fx_version bigint[])
        RETURNS TABLE(o_applied integer, o_code text, o_message text)
        LANGUAGE plpgsql AS $$
        #variable_conflict use_variable
        DECLARE
            n integer := coalesce(array_length(p_keys, 1), 0);
            m integer := coalesce(array_length(p_fx_owner, 1), 0);
            done integer := 0;
            code text;
            msg text;
            seen bigint;
            v bigint;
            r {s}.records%ROWTYPE;
            j integer;
        BEGIN
            BEGIN
                <<completions>>
                FOR i IN 1..n LOOP
                    IF p_scopes[i] <> '' THEN
                        SELECT t.epoch INTO seen FROM {s}.fences t WHERE t.scope = p_scopes[i] FOR SHARE;
                        IF FOUND AND p_epochs[i] < seen THEN
                            code := 'fenced';
                            msg := format('partition %s moved to epoch %s; this member holds epoch %s', p_scopes[i], seen, p_epochs[i]);
                            EXIT completions;
                        END IF;
                    END IF;
                    SELECT * INTO r FROM {s}.records t WHERE t.key = p_keys[i] FOR UPDATE;
                    IF NOT FOUND THEN
                        code := 'fenced'; msg := 'key is no longer held (expired or evicted)'; EXIT completions;
                    END IF;
                    IF r.token <> p_tokens[i] THEN
                        code := 'fenced'; msg := format('claim token %s was superseded by token %s', p_tokens[i], r.token); EXIT completions;
                    END IF;
                    IF r.phase = 3 THEN
                        done := i;  -- an idempotent repeat: applied before, nothing to write
                        CONTINUE completions;
                    END IF;
                    IF r.phase <> 1 THEN
                        code := 'fenced'; msg := format('claim token %s was released', r.token); EXIT completions;
                    END IF;
                    IF p_now >= r.lease_expires_at THEN
                        code := 'fenced'; msg := format('lease of token %s expired before completion', r.token); EXIT completions;
                    END IF;
                    FOR j IN 1..m LOOP
                        CONTINUE WHEN p_fx_owner[j] <> i OR p_fx_kind[j] <> 0;
                        SELECT t.version INTO v FROM {s}.state t WHERE t.key = p_fx_key[j] FOR UPDATE;
                        IF coalesce(v, 0) <> p_fx_version[j] THEN
                            code := 'transactionConflict'; msg := 'a state key changed during the effect'; EXIT completions;
                        END IF;
                        v := NULL;
                    END LOOP;
                    FOR j IN 1..m LOOP
                        CONTINUE WHEN p_fx_owner[j] <> i OR p_fx_kind[j] = 0;
                        INSERT INTO {s}.state AS t (key, value, version)
                            VALUES (p_fx_key[j], CASE WHEN p_fx_kind[j] = 1 THEN p_fx_value[j] END, 1)
                            ON CONFLICT (key) DO UPDATE SET value = excluded.value, version = t.version + 1;
                    END LOOP;
                    UPDATE {s}.records t SET phase = 3, outcome_status = p_statuses[i], outcome_detail = p_details[i],
                        expires_at = CASE WHEN p_retention IS NULL THEN NULL ELSE p_now + p_retention END
                        WHERE t.key = p_keys[i];
                    done := i;
                END LOOP;
                IF code IS NOT NULL AND p_all THEN
                    RAISE EXCEPTION USING ERRCODE = 'EO009';  -- undoes this block's writes; done, code, msg stay
                END IF;
            EXCEPTION WHEN SQLSTATE 'EO009' THEN
                NULL;
            END;
            RETURN QUERY SELECT done, code, msg;
        END
        $$
        """,
        """
        CREATE FUNCTION {s}.release(p_key text, p_token bigint, p_scope text, p_epoch bigint, p_reason text)
        RETURNS void LANGUAGE plpgsql AS $$
        #variable_conflict use_variable
        DECLARE
            seen bigint;
            r {s}.records%ROWTYPE;
        BEGIN
            IF p_scope <> '' THEN
                SELECT t.epoch INTO seen FROM {s}.fences t WHERE t.scope = p_scope FOR SHARE;
                IF FOUND AND p_epoch < seen THEN
                    RAISE EXCEPTION USING ERRCODE = 'EO001',
                        MESSAGE = format('partition %s moved to epoch %s; this member holds epoch %s', p_scope, seen, p_epoch);
                END IF;
            END IF;
            SELECT * INTO r FROM {s}.records t WHERE t.key = p_key FOR UPDATE;
            IF NOT FOUND THEN
                RAISE EXCEPTION USING ERRCODE = 'EO001', MESSAGE = 'key is no longer held (expired or evicted)';
            END IF;
            IF r.token <> p_token THEN
                RAISE EXCEPTION USING ERRCODE = 'EO001', MESSAGE = format('claim token %s was superseded by token %s', p_token, r.token);
            END IF;
            IF r.phase = 3 THEN
                RAISE EXCEPTION USING ERRCODE = 'EO001', MESSAGE = 'key already completed; it cannot be released';
            END IF;
            IF r.phase = 1 THEN
                UPDATE {s}.records t SET phase = 2, last_failure = left(p_reason, 512) WHERE t.key = p_key;
            END IF;
        END
        $$
        """,
        // Removes up to p_limit completed records whose retention ended; returns how many.
        """
        CREATE FUNCTION {s}.purge(p_now bigint, p_limit integer) RETURNS integer LANGUAGE sql AS $$
            WITH gone AS (
                DELETE FROM {s}.records WHERE key IN (
                    SELECT key FROM {s}.records WHERE expires_at IS NOT NULL AND expires_at <= p_now LIMIT p_limit
                    FOR UPDATE SKIP LOCKED)
                RETURNING 1)
            SELECT count(*)::integer FROM gone
        $$
        """,
    ]
}
#endif
