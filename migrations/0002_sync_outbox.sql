-- consentgate: the sync outbox for `consent.source: postgres` (SPEC §13).
--
-- Applied by `consentgate db migrate` after 0001 (idempotent). Every instance
-- that shares the consent table shares these, so an opt-out is queued once and
-- delivered by one instance, whichever it is.
--
-- consentgate_sync_ledger: for each (target, patient), the stamp of the last
-- denial queued (a digest of what the push says). An instance queues an entry
-- only when its upsert changes the stamp, so N instances seeing the same change
-- on the feed queue it once. `key` is a keyed HMAC of target and patient id.
-- `queued` is false when the change came without an address the target needs
-- (only the instance that took the admin write holds the plaintext): an offer
-- with the address still wins over such a row.
--
-- consentgate_sync_outbox: undelivered entries. `sealed` is the AES-256-GCM
-- envelope (sync.key_file) of what the vendor call needs; it may hold a
-- plaintext address, so the row is DELETEd once delivered. `patient` is the
-- audit pseudonym. Workers take rows with SELECT ... FOR UPDATE SKIP LOCKED, so
-- each row is in the hands of one instance at a time; a crashed instance's row
-- lock goes with its connection and another instance retries the row.
--
-- consentgate_sync_cursor: per target, the consent version up to which every
-- change has been offered to the outbox; a starting instance skips the changes
-- at or below it when it loads the whole consent table (no restart storm).

CREATE TABLE IF NOT EXISTS consentgate_sync_ledger (
    key         text        PRIMARY KEY,
    stamp       text        NOT NULL,
    queued      boolean     NOT NULL DEFAULT true,
    updated_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS consentgate_sync_outbox (
    id              bigserial   PRIMARY KEY,
    target          text        NOT NULL,
    patient         text        NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    attempts        integer     NOT NULL DEFAULT 0,
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    parked          boolean     NOT NULL DEFAULT false,
    last_error      text,
    sealed          jsonb       NOT NULL
);

CREATE INDEX IF NOT EXISTS consentgate_sync_outbox_due_idx
    ON consentgate_sync_outbox (target, next_attempt_at, id);

CREATE TABLE IF NOT EXISTS consentgate_sync_cursor (
    target   text   PRIMARY KEY,
    version  bigint NOT NULL
);
