-- IM data: accounts, contacts, communities, messages and the offline inbox.
-- One schema for SQLite and PostgreSQL: ids are chosen by the application
-- (users and communities from `counters`, messages from the time-ordered id
-- generator), integers are BIGINT, texts TEXT, times BIGINT milliseconds.

CREATE TABLE counters (
    name  TEXT PRIMARY KEY,
    value BIGINT NOT NULL
);
-- First user is 10001, first community 1001 (small: exact in JavaScript).
INSERT INTO counters (name, value) VALUES ('user', 10000);
INSERT INTO counters (name, value) VALUES ('community', 1000);

CREATE TABLE users (
    id         BIGINT PRIMARY KEY,
    mobile     TEXT NOT NULL UNIQUE,
    passwd     TEXT NOT NULL,            -- argon2 PHC string
    nickname   TEXT NOT NULL DEFAULT '',
    avatar     TEXT NOT NULL DEFAULT '',
    memo       TEXT NOT NULL DEFAULT '',
    created_ms BIGINT NOT NULL
);

-- kind 1: target is a user (friend); kind 2: target is a community (member).
CREATE TABLE contacts (
    owner      BIGINT NOT NULL,
    target     BIGINT NOT NULL,
    kind       BIGINT NOT NULL,
    memo       TEXT NOT NULL DEFAULT '',
    created_ms BIGINT NOT NULL,
    CONSTRAINT contacts_unique UNIQUE (owner, target, kind)
);
CREATE INDEX contacts_by_target ON contacts (target, kind);

CREATE TABLE communities (
    id         BIGINT PRIMARY KEY,
    name       TEXT NOT NULL,
    owner      BIGINT NOT NULL,
    icon       TEXT NOT NULL DEFAULT '',
    memo       TEXT NOT NULL DEFAULT '',
    kind       BIGINT NOT NULL DEFAULT 0,
    created_ms BIGINT NOT NULL
);
CREATE INDEX communities_by_owner ON communities (owner);

-- conv: "u:<smaller id>:<larger id>" for 1:1, "c:<community id>" for groups.
CREATE TABLE messages (
    id         BIGINT PRIMARY KEY,
    conv       TEXT NOT NULL,
    sender     BIGINT NOT NULL,
    target     BIGINT NOT NULL,
    cmd        BIGINT NOT NULL,
    media      BIGINT NOT NULL,
    content    TEXT NOT NULL DEFAULT '',
    pic        TEXT NOT NULL DEFAULT '',
    url        TEXT NOT NULL DEFAULT '',
    memo       TEXT NOT NULL DEFAULT '',
    amount     BIGINT NOT NULL DEFAULT 0,
    created_ms BIGINT NOT NULL
);
CREATE INDEX messages_by_conv ON messages (conv, id);

-- Messages a recipient could not get live, until a session took them.
CREATE TABLE inbox (
    uid    BIGINT NOT NULL,
    msg_id BIGINT NOT NULL,
    PRIMARY KEY (uid, msg_id)
);
