//! The IM data: accounts, contacts (friends and community memberships),
//! communities, messages and the offline inbox.
//!
//! One code path for both databases through sqlx's `Any` driver: a SQLite
//! file standalone, PostgreSQL in a cluster. Queries use `$n` placeholders,
//! which both drivers accept; the schema (`migrations/`) is plain BIGINT/TEXT
//! so the same migration runs on both. Ids are chosen here, not by the
//! database: users and communities count up from the `counters` table (small,
//! exact in JavaScript), messages get the caller's time-ordered id.

use std::borrow::Cow;
use std::future::Future;
use std::pin::Pin;

use chatroom_common::proto::protocol::ChatMsg;
use serde::Serialize;
use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::migrate::{Migration, MigrationSource, MigrationType, Migrator};
use sqlx::{AnyPool, Row};

use chatroom_common::proto::protocol::ChatCmd;

use crate::config::StoreConfig;
use crate::id::now_ms;

/// `contacts.kind` of a friend.
pub const KIND_USER: i64 = 1;
/// `contacts.kind` of a community membership.
pub const KIND_COMMUNITY: i64 = 2;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database: {0}")]
    Db(sqlx::Error),
    #[error("migration: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("store.url: {0}")]
    Folder(std::io::Error),
    #[error("this mobile number is already registered")]
    MobileTaken,
    #[error("no such user")]
    NoSuchUser,
    #[error("no such community")]
    NoSuchCommunity,
    #[error("you cannot befriend yourself")]
    SelfFriend,
    #[error("you are already friends")]
    AlreadyFriends,
    #[error("you can own at most {0} communities")]
    TooManyCommunities(u32),
}

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        // Every database failure passes here (the `?` in each query).
        crate::metrics::LOGIC.store_errors.inc();
        StoreError::Db(e)
    }
}

impl StoreError {
    fn is_unique_violation(&self) -> bool {
        matches!(self, StoreError::Db(sqlx::Error::Database(d)) if d.is_unique_violation())
    }
}

/// A user as others may see it (never the password hash).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct User {
    pub id: i64,
    pub mobile: String,
    pub nickname: String,
    pub avatar: String,
    pub memo: String,
    pub created_ms: i64,
}

/// What registration stores.
#[derive(Debug, Clone)]
pub struct NewUser {
    pub mobile: String,
    /// argon2 PHC string.
    pub passwd_hash: String,
    pub nickname: String,
    pub avatar: String,
    pub memo: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Community {
    pub id: i64,
    pub name: String,
    pub owner: i64,
    pub icon: String,
    pub memo: String,
    pub kind: i64,
    pub created_ms: i64,
}

#[derive(Debug, Clone)]
pub struct NewCommunity {
    pub name: String,
    pub owner: i64,
    pub icon: String,
    pub memo: String,
    pub kind: i64,
}

/// The conversation a message belongs to: both directions of a 1:1 chat
/// share one key, a community has its own.
pub fn conv_key(cmd: i32, a: i64, b: i64) -> String {
    if cmd == ChatCmd::Community as i32 {
        format!("c:{b}")
    } else {
        format!("u:{}:{}", a.min(b), a.max(b))
    }
}

/// The schema, compiled in (no migration folder needed at run time).
#[derive(Debug)]
struct Embedded;

impl MigrationSource<'static> for Embedded {
    #[allow(clippy::type_complexity)]
    fn resolve(
        self,
    ) -> Pin<
        Box<
            dyn Future<Output = Result<Vec<Migration>, Box<dyn std::error::Error + Send + Sync>>>
                + Send,
        >,
    > {
        Box::pin(async {
            Ok(vec![Migration::new(
                1,
                Cow::Borrowed("im"),
                MigrationType::Simple,
                Cow::Borrowed(include_str!("../migrations/0001_im.sql")),
                false,
            )])
        })
    }
}

const USER_COLS: &str = "id, mobile, nickname, avatar, memo, created_ms";
const COMMUNITY_COLS: &str = "id, name, owner, icon, memo, kind, created_ms";
const MSG_COLS: &str =
    "id, sender, target, cmd, media, content, pic, url, memo, amount, created_ms";

fn user(r: &AnyRow) -> Result<User, sqlx::Error> {
    Ok(User {
        id: r.try_get("id")?,
        mobile: r.try_get("mobile")?,
        nickname: r.try_get("nickname")?,
        avatar: r.try_get("avatar")?,
        memo: r.try_get("memo")?,
        created_ms: r.try_get("created_ms")?,
    })
}

fn community(r: &AnyRow) -> Result<Community, sqlx::Error> {
    Ok(Community {
        id: r.try_get("id")?,
        name: r.try_get("name")?,
        owner: r.try_get("owner")?,
        icon: r.try_get("icon")?,
        memo: r.try_get("memo")?,
        kind: r.try_get("kind")?,
        created_ms: r.try_get("created_ms")?,
    })
}

fn message(r: &AnyRow) -> Result<ChatMsg, sqlx::Error> {
    let small = |col: &str| -> Result<i32, sqlx::Error> {
        let v: i64 = r.try_get(col)?;
        Ok(i32::try_from(v).unwrap_or(0))
    };
    Ok(ChatMsg {
        id: r.try_get("id")?,
        userid: r.try_get("sender")?,
        dstid: r.try_get("target")?,
        cmd: small("cmd")?,
        media: small("media")?,
        content: r.try_get("content")?,
        pic: r.try_get("pic")?,
        url: r.try_get("url")?,
        memo: r.try_get("memo")?,
        amount: r.try_get("amount")?,
        created_ms: r.try_get("created_ms")?,
    })
}

/// The database, shared by every request (a connection pool).
#[derive(Clone, Debug)]
pub struct Store {
    pool: AnyPool,
}

impl Store {
    /// Connects (creating a SQLite file's folder first) and brings the schema
    /// up to date.
    pub async fn connect(cfg: &StoreConfig) -> Result<Self, StoreError> {
        sqlx::any::install_default_drivers();
        let sqlite = cfg.url.starts_with("sqlite:");
        if let Some(dir) = sqlite_folder(&cfg.url) {
            std::fs::create_dir_all(&dir).map_err(StoreError::Folder)?;
        }
        let pool = AnyPoolOptions::new()
            .max_connections(cfg.max_connections)
            .acquire_timeout(cfg.acquire_timeout)
            .connect(&cfg.url)
            .await?;
        if sqlite {
            // Readers do not block the writer; the setting stays with the file.
            sqlx::query("PRAGMA journal_mode=WAL")
                .execute(&pool)
                .await?;
        }
        Migrator::new(Embedded).await?.run(&pool).await?;
        Ok(Store { pool })
    }

    pub async fn close(&self) {
        self.pool.close().await;
    }

    /// A trivial query (readiness).
    pub async fn ping(&self) -> Result<(), StoreError> {
        let _t = crate::metrics::StoreTimer::start();
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    // ------------------------------------------------------------ users

    /// Registers a user; its id is the next from the counter.
    pub async fn create_user(&self, u: &NewUser) -> Result<User, StoreError> {
        let _t = crate::metrics::StoreTimer::start();
        if self.user_by_mobile(&u.mobile).await?.is_some() {
            return Err(StoreError::MobileTaken);
        }
        let created_ms = now_ms() as i64;
        let result: Result<User, StoreError> = async {
            let mut tx = self.pool.begin().await?;
            let id = next_counter(&mut tx, "user").await?;
            sqlx::query(
                "INSERT INTO users (id, mobile, passwd, nickname, avatar, memo, created_ms) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7)",
            )
            .bind(id)
            .bind(&u.mobile)
            .bind(&u.passwd_hash)
            .bind(&u.nickname)
            .bind(&u.avatar)
            .bind(&u.memo)
            .bind(created_ms)
            .execute(&mut *tx)
            .await?;
            tx.commit().await?;
            Ok(User {
                id,
                mobile: u.mobile.clone(),
                nickname: u.nickname.clone(),
                avatar: u.avatar.clone(),
                memo: u.memo.clone(),
                created_ms,
            })
        }
        .await;
        // Two registrations racing for one number: the loser learns it here.
        result.map_err(|e| {
            if e.is_unique_violation() {
                StoreError::MobileTaken
            } else {
                e
            }
        })
    }

    pub async fn user(&self, id: i64) -> Result<Option<User>, StoreError> {
        let _t = crate::metrics::StoreTimer::start();
        let row = sqlx::query(&format!("SELECT {USER_COLS} FROM users WHERE id = $1"))
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.as_ref().map(user).transpose()?)
    }

    pub async fn user_by_mobile(&self, mobile: &str) -> Result<Option<User>, StoreError> {
        let _t = crate::metrics::StoreTimer::start();
        let row = sqlx::query(&format!("SELECT {USER_COLS} FROM users WHERE mobile = $1"))
            .bind(mobile)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.as_ref().map(user).transpose()?)
    }

    /// The user and its password hash, for login.
    pub async fn credentials(&self, mobile: &str) -> Result<Option<(User, String)>, StoreError> {
        let _t = crate::metrics::StoreTimer::start();
        let row = sqlx::query(&format!(
            "SELECT {USER_COLS}, passwd FROM users WHERE mobile = $1"
        ))
        .bind(mobile)
        .fetch_optional(&self.pool)
        .await?;
        match row {
            None => Ok(None),
            Some(r) => Ok(Some((user(&r)?, r.try_get("passwd")?))),
        }
    }

    // ------------------------------------------------------------ friends

    /// Makes `a` and `b` friends: both rows or neither.
    pub async fn add_friend(&self, a: i64, b: i64) -> Result<User, StoreError> {
        let _t = crate::metrics::StoreTimer::start();
        if a == b {
            return Err(StoreError::SelfFriend);
        }
        let friend = self.user(b).await?.ok_or(StoreError::NoSuchUser)?;
        if self.is_friend(a, b).await? {
            return Err(StoreError::AlreadyFriends);
        }
        let now = now_ms() as i64;
        let result: Result<(), StoreError> = async {
            let mut tx = self.pool.begin().await?;
            for (owner, target) in [(a, b), (b, a)] {
                sqlx::query(
                    "INSERT INTO contacts (owner, target, kind, memo, created_ms) \
                     VALUES ($1, $2, $3, '', $4)",
                )
                .bind(owner)
                .bind(target)
                .bind(KIND_USER)
                .bind(now)
                .execute(&mut *tx)
                .await?;
            }
            tx.commit().await?;
            Ok(())
        }
        .await;
        match result {
            Err(e) if e.is_unique_violation() => Err(StoreError::AlreadyFriends),
            Err(e) => Err(e),
            Ok(()) => Ok(friend),
        }
    }

    pub async fn is_friend(&self, a: i64, b: i64) -> Result<bool, StoreError> {
        let _t = crate::metrics::StoreTimer::start();
        self.has_contact(a, b, KIND_USER).await
    }

    pub async fn is_member(&self, uid: i64, community: i64) -> Result<bool, StoreError> {
        let _t = crate::metrics::StoreTimer::start();
        self.has_contact(uid, community, KIND_COMMUNITY).await
    }

    async fn has_contact(&self, owner: i64, target: i64, kind: i64) -> Result<bool, StoreError> {
        let row = sqlx::query(
            "SELECT 1 AS one FROM contacts WHERE owner = $1 AND target = $2 AND kind = $3",
        )
        .bind(owner)
        .bind(target)
        .bind(kind)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.is_some())
    }

    /// A user's friends, by id.
    pub async fn friends(&self, uid: i64) -> Result<Vec<User>, StoreError> {
        let _t = crate::metrics::StoreTimer::start();
        let rows = sqlx::query(&format!(
            "SELECT {} FROM contacts c JOIN users u ON u.id = c.target \
             WHERE c.owner = $1 AND c.kind = $2 ORDER BY u.id",
            prefixed("u", USER_COLS)
        ))
        .bind(uid)
        .bind(KIND_USER)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.iter().map(user).collect::<Result<_, _>>()?)
    }

    // ------------------------------------------------------------ communities

    /// Creates a community owned (and joined) by `c.owner`, unless it already
    /// owns `max_owned`.
    pub async fn create_community(
        &self,
        c: &NewCommunity,
        max_owned: u32,
    ) -> Result<Community, StoreError> {
        let _t = crate::metrics::StoreTimer::start();
        let created_ms = now_ms() as i64;
        let mut tx = self.pool.begin().await?;
        // Taking the counter first serialises creations, so the count below
        // cannot be raced past the limit.
        let id = next_counter(&mut tx, "community").await?;
        let owned: i64 = sqlx::query("SELECT COUNT(*) AS n FROM communities WHERE owner = $1")
            .bind(c.owner)
            .fetch_one(&mut *tx)
            .await?
            .try_get("n")?;
        if owned >= i64::from(max_owned) {
            tx.rollback().await?;
            return Err(StoreError::TooManyCommunities(max_owned));
        }
        sqlx::query(
            "INSERT INTO communities (id, name, owner, icon, memo, kind, created_ms) \
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(id)
        .bind(&c.name)
        .bind(c.owner)
        .bind(&c.icon)
        .bind(&c.memo)
        .bind(c.kind)
        .bind(created_ms)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "INSERT INTO contacts (owner, target, kind, memo, created_ms) \
             VALUES ($1, $2, $3, '', $4)",
        )
        .bind(c.owner)
        .bind(id)
        .bind(KIND_COMMUNITY)
        .bind(created_ms)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(Community {
            id,
            name: c.name.clone(),
            owner: c.owner,
            icon: c.icon.clone(),
            memo: c.memo.clone(),
            kind: c.kind,
            created_ms,
        })
    }

    pub async fn community(&self, id: i64) -> Result<Option<Community>, StoreError> {
        let _t = crate::metrics::StoreTimer::start();
        let row = sqlx::query(&format!(
            "SELECT {COMMUNITY_COLS} FROM communities WHERE id = $1"
        ))
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.as_ref().map(community).transpose()?)
    }

    /// Joins a community; joining one the user is in already is fine.
    pub async fn join_community(&self, uid: i64, id: i64) -> Result<Community, StoreError> {
        let _t = crate::metrics::StoreTimer::start();
        let c = self
            .community(id)
            .await?
            .ok_or(StoreError::NoSuchCommunity)?;
        sqlx::query(
            "INSERT INTO contacts (owner, target, kind, memo, created_ms) \
             VALUES ($1, $2, $3, '', $4) ON CONFLICT (owner, target, kind) DO NOTHING",
        )
        .bind(uid)
        .bind(id)
        .bind(KIND_COMMUNITY)
        .bind(now_ms() as i64)
        .execute(&self.pool)
        .await?;
        Ok(c)
    }

    /// The communities a user belongs to, by id.
    pub async fn communities_of(&self, uid: i64) -> Result<Vec<Community>, StoreError> {
        let _t = crate::metrics::StoreTimer::start();
        let rows = sqlx::query(&format!(
            "SELECT {} FROM contacts c JOIN communities m ON m.id = c.target \
             WHERE c.owner = $1 AND c.kind = $2 ORDER BY m.id",
            prefixed("m", COMMUNITY_COLS)
        ))
        .bind(uid)
        .bind(KIND_COMMUNITY)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.iter().map(community).collect::<Result<_, _>>()?)
    }

    /// The member ids of a community.
    pub async fn members(&self, community: i64) -> Result<Vec<i64>, StoreError> {
        let _t = crate::metrics::StoreTimer::start();
        let rows = sqlx::query(
            "SELECT owner FROM contacts WHERE target = $1 AND kind = $2 ORDER BY owner",
        )
        .bind(community)
        .bind(KIND_COMMUNITY)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| r.try_get("owner").map_err(StoreError::from))
            .collect()
    }

    // ------------------------------------------------------------ messages

    /// Stores a message (its `id` already given) and, in the same
    /// transaction, an inbox row for each of `inbox`.
    pub async fn insert_message(&self, m: &ChatMsg, inbox: &[i64]) -> Result<(), StoreError> {
        let _t = crate::metrics::StoreTimer::start();
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "INSERT INTO messages (id, conv, sender, target, cmd, media, content, pic, url, memo, \
             amount, created_ms) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)",
        )
        .bind(m.id)
        .bind(conv_key(m.cmd, m.userid, m.dstid))
        .bind(m.userid)
        .bind(m.dstid)
        .bind(i64::from(m.cmd))
        .bind(i64::from(m.media))
        .bind(&m.content)
        .bind(&m.pic)
        .bind(&m.url)
        .bind(&m.memo)
        .bind(m.amount)
        .bind(m.created_ms)
        .execute(&mut *tx)
        .await?;
        for uid in inbox {
            sqlx::query("INSERT INTO inbox (uid, msg_id) VALUES ($1, $2)")
                .bind(uid)
                .bind(m.id)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Puts already stored messages in `uid`'s inbox (ids of messages that
    /// do not exist are ignored; ones already there stay once).
    pub async fn add_inbox(&self, uid: i64, ids: &[i64]) -> Result<u64, StoreError> {
        let _t = crate::metrics::StoreTimer::start();
        let mut n = 0;
        for id in ids {
            n += sqlx::query(
                "INSERT INTO inbox (uid, msg_id) SELECT $1, id FROM messages WHERE id = $2 \
                 ON CONFLICT DO NOTHING",
            )
            .bind(uid)
            .bind(id)
            .execute(&self.pool)
            .await?
            .rows_affected();
        }
        Ok(n)
    }

    /// True when an insert failed only because the id was taken (two logic
    /// nodes sharing a node number): the caller may retry with a new id.
    pub fn is_duplicate_id(e: &StoreError) -> bool {
        e.is_unique_violation()
    }

    /// Takes a stored message back (its delivery could not be started).
    pub async fn delete_message(&self, id: i64) -> Result<(), StoreError> {
        let _t = crate::metrics::StoreTimer::start();
        let mut tx = self.pool.begin().await?;
        sqlx::query("DELETE FROM inbox WHERE msg_id = $1")
            .bind(id)
            .execute(&mut *tx)
            .await?;
        sqlx::query("DELETE FROM messages WHERE id = $1")
            .bind(id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    pub async fn message(&self, id: i64) -> Result<Option<ChatMsg>, StoreError> {
        let _t = crate::metrics::StoreTimer::start();
        let row = sqlx::query(&format!("SELECT {MSG_COLS} FROM messages WHERE id = $1"))
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.as_ref().map(message).transpose()?)
    }

    /// One page of a conversation, newest first, with ids below `before`.
    pub async fn history(
        &self,
        conv: &str,
        before: i64,
        limit: u32,
    ) -> Result<Vec<ChatMsg>, StoreError> {
        let _t = crate::metrics::StoreTimer::start();
        let rows = sqlx::query(&format!(
            "SELECT {MSG_COLS} FROM messages WHERE conv = $1 AND id < $2 ORDER BY id DESC LIMIT $3"
        ))
        .bind(conv)
        .bind(before)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.iter().map(message).collect::<Result<_, _>>()?)
    }

    /// Up to `limit` of a user's inbox messages, oldest first.
    pub async fn pending(&self, uid: i64, limit: u32) -> Result<Vec<ChatMsg>, StoreError> {
        let _t = crate::metrics::StoreTimer::start();
        let rows = sqlx::query(&format!(
            "SELECT {} FROM inbox i JOIN messages m ON m.id = i.msg_id \
             WHERE i.uid = $1 ORDER BY i.msg_id LIMIT $2",
            prefixed("m", MSG_COLS)
        ))
        .bind(uid)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.iter().map(message).collect::<Result<_, _>>()?)
    }

    /// Removes a user's inbox entries up to and including `upto`; answers
    /// how many went.
    pub async fn ack_pending(&self, uid: i64, upto: i64) -> Result<u64, StoreError> {
        let _t = crate::metrics::StoreTimer::start();
        let r = sqlx::query("DELETE FROM inbox WHERE uid = $1 AND msg_id <= $2")
            .bind(uid)
            .bind(upto)
            .execute(&self.pool)
            .await?;
        Ok(r.rows_affected())
    }
}

/// `a, b` -> `t.a, t.b` (joins name their columns).
fn prefixed(table: &str, cols: &str) -> String {
    cols.split(", ")
        .map(|c| format!("{table}.{c}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Takes the next value of a counter inside `tx`.
async fn next_counter(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    name: &str,
) -> Result<i64, StoreError> {
    let row = sqlx::query("UPDATE counters SET value = value + 1 WHERE name = $1 RETURNING value")
        .bind(name)
        .fetch_one(&mut **tx)
        .await?;
    Ok(row.try_get("value")?)
}

/// The folder of a `sqlite:` URL's file, if it names one.
fn sqlite_folder(url: &str) -> Option<std::path::PathBuf> {
    let rest = url.strip_prefix("sqlite:")?;
    let rest = rest.strip_prefix("//").unwrap_or(rest);
    let path = rest.split('?').next().unwrap_or("");
    if path.is_empty() || path == ":memory:" {
        return None;
    }
    std::path::Path::new(path)
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .map(|p| p.to_path_buf())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sqlite_folders() {
        assert_eq!(
            sqlite_folder("sqlite://data/chatroom.db?mode=rwc"),
            Some("data".into())
        );
        assert_eq!(sqlite_folder("sqlite:///tmp/x/a.db"), Some("/tmp/x".into()));
        assert_eq!(sqlite_folder("sqlite://a.db"), None);
        assert_eq!(sqlite_folder("sqlite::memory:"), None);
        assert_eq!(sqlite_folder("postgres://x/y"), None);
    }

    #[test]
    fn conversations_are_symmetric() {
        assert_eq!(
            conv_key(ChatCmd::Single as i32, 7, 3),
            conv_key(ChatCmd::Single as i32, 3, 7)
        );
        assert_eq!(conv_key(ChatCmd::Single as i32, 7, 3), "u:3:7");
        assert_eq!(conv_key(ChatCmd::Community as i32, 7, 3), "c:3");
    }

    #[test]
    fn prefixes() {
        assert_eq!(prefixed("u", "id, name"), "u.id, u.name");
    }
}
