-- consentgate: the consent table for `consent.source: postgres` (SPEC §4, §5).
--
-- Apply with `consentgate db migrate --config PATH` (idempotent; recorded in
-- consentgate_schema_migrations), or by hand:
--   psql "postgres://USER@HOST:5432/DB" -v ON_ERROR_STOP=1 -f migrations/0001_consent.sql
--
-- One row per patient. `record` is the SPEC §5 record in STORED form: emails
-- and phones only as `email_sha256` / `phone_sha256`, never plaintext (the
-- CHECK below refuses plaintext). Deletes are tombstones (`deleted = true`) so
-- every consentgate instance sees them, on the live feed and on resync; a plain
-- SQL DELETE is turned into a tombstone by a trigger.
--
-- Every insert and update takes a new `version` from a sequence and stamps
-- `changed_at` with clock_timestamp(). Writers to this table are serialised by
-- a transaction-scoped advisory lock (keyed by the table's oid) taken before the
-- version is drawn, so versions become visible in commit order and a reader
-- that has applied everything up to version V can never miss a version <= V.
-- Each change is announced on channel `consentgate_consent` with the payload
-- {"patient_id": ..., "version": ...} (no consent data; far below 8000 bytes).

CREATE SEQUENCE IF NOT EXISTS consentgate_consent_version_seq;

CREATE TABLE IF NOT EXISTS consentgate_consent (
    patient_id      text        PRIMARY KEY,
    record          jsonb       NOT NULL,
    updated_at      timestamptz NOT NULL,
    restrictiveness integer     NOT NULL DEFAULT 0,
    deleted         boolean     NOT NULL DEFAULT false,
    version         bigint      NOT NULL,
    changed_at      timestamptz NOT NULL,
    CONSTRAINT consentgate_consent_patient_id_len
        CHECK (length(patient_id) BETWEEN 1 AND 256),
    CONSTRAINT consentgate_consent_stored_form CHECK (
        jsonb_typeof(record) = 'object'
        AND NOT coalesce(record #> '{identifiers}' ? 'emails', false)
        AND NOT coalesce(record #> '{identifiers}' ? 'phones', false)
    )
);

CREATE UNIQUE INDEX IF NOT EXISTS consentgate_consent_version_idx
    ON consentgate_consent (version);

CREATE OR REPLACE FUNCTION consentgate_consent_stamp() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    -- Serialise writers until commit so versions commit in order.
    PERFORM pg_advisory_xact_lock(TG_RELID::bigint);
    NEW.version := nextval(
        (quote_ident(TG_TABLE_SCHEMA) || '.consentgate_consent_version_seq')::regclass);
    NEW.changed_at := clock_timestamp();
    RETURN NEW;
END
$$;

CREATE OR REPLACE FUNCTION consentgate_consent_notify() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('consentgate_consent',
        json_build_object('patient_id', NEW.patient_id, 'version', NEW.version)::text);
    RETURN NULL;
END
$$;

-- A plain DELETE becomes a tombstone, so the deletion propagates.
CREATE OR REPLACE FUNCTION consentgate_consent_tombstone() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF NOT OLD.deleted THEN
        EXECUTE format('UPDATE %I.%I SET deleted = true, record = ''{}''::jsonb, '
                       'updated_at = clock_timestamp(), restrictiveness = 0 '
                       'WHERE patient_id = $1', TG_TABLE_SCHEMA, TG_TABLE_NAME)
            USING OLD.patient_id;
    END IF;
    RETURN NULL;
END
$$;

DROP TRIGGER IF EXISTS consentgate_consent_stamp ON consentgate_consent;
CREATE TRIGGER consentgate_consent_stamp
    BEFORE INSERT OR UPDATE ON consentgate_consent
    FOR EACH ROW EXECUTE FUNCTION consentgate_consent_stamp();

DROP TRIGGER IF EXISTS consentgate_consent_notify ON consentgate_consent;
CREATE TRIGGER consentgate_consent_notify
    AFTER INSERT OR UPDATE ON consentgate_consent
    FOR EACH ROW EXECUTE FUNCTION consentgate_consent_notify();

DROP TRIGGER IF EXISTS consentgate_consent_tombstone ON consentgate_consent;
CREATE TRIGGER consentgate_consent_tombstone
    BEFORE DELETE ON consentgate_consent
    FOR EACH ROW EXECUTE FUNCTION consentgate_consent_tombstone();
