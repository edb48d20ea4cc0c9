//! The business rules shared by the gRPC service and the HTTP API, as three
//! services with private state: [`Auth`] (who a token belongs to),
//! [`Rooms`] (what a valid room message is, and handing accepted messages to
//! the queue — numbered in their room's stream first, and published in that
//! order) and [`Im`] (the IM layer's store, settings and limits).

use bytes::Bytes;
use chatroom_common::proto::protocol::MsgLevel;
use chatroom_common::proto::queue::{QueueMsg, RoomMsg, queue_msg};
use chatroom_common::rooms;
use chatroom_common::token::{TokenError, Tokens};
use chatroom_queue::{Publisher, QueueError};
use prost::Message;

use crate::config::{ImConfig, LimitsConfig, LogicConfig};
use crate::error::ApiError;
use crate::id::{self, IdGen};
use crate::password::Passwords;
use crate::presence::Presence;
use crate::ratelimit::RateLimiter;
use crate::store::Store;
use crate::stream::{Entry, Streams};

/// Everything a request needs, one service per concern; one per node,
/// shared behind an `Arc`. Each service keeps its state private.
pub struct App {
    /// Who a token belongs to.
    pub auth: Auth,
    /// Room messages: checks, numbering, publishing; presence.
    pub rooms: Rooms,
    /// The IM layer's state: store, settings, passwords, ids, limits.
    pub im: Im,
    max_body_bytes: usize,
}

impl App {
    pub fn new(
        cfg: &LogicConfig,
        node_id: String,
        presence: Presence,
        streams: Streams,
        publisher: Publisher,
        store: Store,
    ) -> Self {
        let im = &cfg.im;
        App {
            auth: Auth {
                tokens: Tokens::new(cfg.token.secret.as_bytes(), cfg.token.ttl),
                test_tokens: cfg.http.test_token,
            },
            rooms: Rooms {
                ids: IdGen::new(cfg.id_node(&node_id)),
                presence,
                streams,
                publisher,
                limits: cfg.limits.clone(),
                heartbeat_secs: u32::try_from(cfg.heartbeat.as_secs()).unwrap_or(u32::MAX),
            },
            im: Im {
                chat_ids: IdGen::chat(cfg.id_node(&node_id)),
                admin_token: cfg.http.admin_token.clone(),
                store,
                passwords: Passwords::new(im.password_memory_kib, im.password_iterations),
                chat_limiter: RateLimiter::new(im.chat_rate_per_sec, im.chat_burst),
                api_limiter: RateLimiter::new(im.api_rate_per_sec, im.api_burst),
                cfg: im.clone(),
            },
            max_body_bytes: cfg.http.max_body_bytes,
        }
    }

    /// HTTP bodies larger than this are refused.
    pub fn max_body_bytes(&self) -> usize {
        self.max_body_bytes
    }
}

/// Sign-in tokens: verifying and issuing them.
pub struct Auth {
    tokens: Tokens,
    test_tokens: bool,
}

impl Auth {
    /// Whether `POST /tk` hands out test tokens.
    pub fn test_tokens(&self) -> bool {
        self.test_tokens
    }

    /// The uid of a valid token (`Bearer ` prefix accepted, in any case).
    pub fn verify(&self, token: &str) -> Result<String, ApiError> {
        let token = token.trim();
        let token = match token.get(..6) {
            // A bare "Bearer" is an empty token, not a malformed one.
            Some(p) if p.eq_ignore_ascii_case("bearer") && token.len() == 6 => "",
            Some(p) if p.eq_ignore_ascii_case("bearer") && token[6..].starts_with(' ') => {
                &token[7..]
            }
            _ => token,
        };
        self.tokens
            .verify(token)
            .map(|c| c.sub)
            .map_err(ApiError::LoginNeeded)
    }

    /// A fresh token for `uid`.
    pub fn issue(&self, uid: &str) -> Result<String, ApiError> {
        self.tokens.issue(uid).map_err(|e| match e {
            TokenError::BadUid => ApiError::BadUid,
            other => ApiError::Issue(other),
        })
    }
}

/// Room messages on their way to the queue, and who is online where.
pub struct Rooms {
    ids: IdGen,
    presence: Presence,
    /// Numbers and keeps every room's messages.
    streams: Streams,
    publisher: Publisher,
    limits: LimitsConfig,
    heartbeat_secs: u32,
}

impl Rooms {
    pub fn presence(&self) -> &Presence {
        &self.presence
    }

    pub fn streams(&self) -> &Streams {
        &self.streams
    }

    /// The heartbeat period conn sessions are told to keep.
    pub fn heartbeat_secs(&self) -> u32 {
        self.heartbeat_secs
    }

    /// Non-empty and not too long. Room ids end up in Redis keys, log lines
    /// and conn's room maps, so control characters are refused too.
    pub fn check_room(&self, room: &str) -> Result<(), ApiError> {
        if room.is_empty() {
            return Err(ApiError::EmptyRoom);
        }
        if room.len() > self.limits.max_room_id_len {
            return Err(ApiError::RoomTooLong(self.limits.max_room_id_len));
        }
        if room.chars().any(char::is_control) {
            return Err(ApiError::BadRoomChars);
        }
        Ok(())
    }

    /// Hands one queue message to the queue.
    pub async fn enqueue(&self, msg: QueueMsg) -> Result<(), ApiError> {
        self.publisher
            .publish(Bytes::from(msg.encode_to_vec()))
            .await?;
        Ok(())
    }

    /// Checks a room message and publishes it; answers its id.
    pub async fn publish(
        &self,
        uid: &str,
        room: &str,
        level: i32,
        data: Bytes,
    ) -> Result<u64, ApiError> {
        let msg = self.check_room_msg(uid, room, level, data)?;
        self.publish_room_msgs(vec![msg])
            .await
            .pop()
            .expect("one answer per message")
    }

    /// A room message as it goes to the queue, if it may be sent.
    pub fn check_room_msg(
        &self,
        uid: &str,
        room: &str,
        level: i32,
        data: Bytes,
    ) -> Result<RoomMsg, ApiError> {
        self.check_room(room)?;
        // Community rooms carry only ChatMsgs, sent through `Chat`.
        if rooms::is_community(room) {
            return Err(ApiError::ReservedRoom);
        }
        let level = MsgLevel::try_from(level).map_err(|_| ApiError::BadLevel(level))?;
        if data.is_empty() {
            return Err(ApiError::MissingMessage);
        }
        if data.len() > self.limits.max_message_bytes {
            return Err(ApiError::MessageTooLarge(self.limits.max_message_bytes));
        }
        Ok(RoomMsg {
            id: self.ids.next_id(),
            room_id: room.to_string(),
            level: level as i32,
            data,
            uid: uid.to_string(),
            ts_ms: id::now_ms() as i64,
            chat: false,
            offset: 0,
            epoch: 0,
        })
    }

    /// Numbers checked room messages in their rooms' streams and publishes
    /// them; answers each message's id, in the order given. The messages of
    /// one room keep their order: they are numbered in one call and handed
    /// to the queue in one publish, so a session's pipelined messages reach
    /// every receiver as it sent them. Rooms are handled concurrently.
    pub async fn publish_room_msgs(&self, msgs: Vec<RoomMsg>) -> Vec<Result<u64, ApiError>> {
        let n = msgs.len();
        let mut by_room: Vec<(String, Vec<(usize, RoomMsg)>)> = Vec::new();
        for (i, m) in msgs.into_iter().enumerate() {
            match by_room.iter_mut().find(|(r, _)| *r == m.room_id) {
                Some((_, v)) => v.push((i, m)),
                None => by_room.push((m.room_id.clone(), vec![(i, m)])),
            }
        }
        let done = futures_util::future::join_all(
            by_room
                .into_iter()
                .map(|(room, run)| self.publish_run(room, run)),
        )
        .await;
        let mut out: Vec<Option<Result<u64, ApiError>>> = (0..n).map(|_| None).collect();
        for (i, r) in done.into_iter().flatten() {
            out[i] = Some(r);
        }
        out.into_iter()
            .map(|r| r.unwrap_or(Err(ApiError::Internal("message lost track of".into()))))
            .collect()
    }

    /// One room's run of messages: numbered, then published together.
    async fn publish_run(
        &self,
        room: String,
        mut run: Vec<(usize, RoomMsg)>,
    ) -> Vec<(usize, Result<u64, ApiError>)> {
        let entries: Vec<Entry> = run
            .iter()
            .map(|(_, m)| Entry {
                level: m.level,
                data: m.data.clone(),
            })
            .collect();
        let numbered = match self.streams.append(&room, &entries).await {
            Ok(n) => n,
            Err(e) => {
                let e = ApiError::from(e);
                e.log();
                return run
                    .into_iter()
                    .map(|(i, _)| (i, Err(ApiError::Busy)))
                    .collect();
            }
        };
        let bodies: Vec<Bytes> = run
            .iter_mut()
            .enumerate()
            .map(|(k, (_, m))| {
                m.offset = numbered.first + k as u64;
                m.epoch = numbered.epoch;
                let q = QueueMsg {
                    body: Some(queue_msg::Body::Room(m.clone())),
                };
                Bytes::from(q.encode_to_vec())
            })
            .collect();
        match self.publisher.publish_many(&bodies).await {
            Ok(()) => {
                tracing::debug!(%room, messages = run.len(), first = numbered.first, "published");
                run.into_iter().map(|(i, m)| (i, Ok(m.id))).collect()
            }
            Err(e) => {
                // The offsets stay taken: receivers see a gap, which conn
                // skips after its reorder wait; the senders are told to retry.
                let e = ApiError::from(e);
                e.log();
                let busy = matches!(e, ApiError::Busy);
                run.into_iter()
                    .map(|(i, _)| {
                        let e = if busy {
                            ApiError::Busy
                        } else {
                            ApiError::QueueUnavailable(QueueError::Closed)
                        };
                        (i, Err(e))
                    })
                    .collect()
            }
        }
    }
}

/// The IM layer's state.
pub struct Im {
    store: Store,
    cfg: ImConfig,
    passwords: Passwords,
    /// 53-bit ids of IM messages.
    chat_ids: IdGen,
    /// Chat messages per user.
    chat_limiter: RateLimiter,
    /// IM HTTP requests per user.
    api_limiter: RateLimiter,
    admin_token: String,
}

impl Im {
    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn cfg(&self) -> &ImConfig {
        &self.cfg
    }

    pub fn passwords(&self) -> &Passwords {
        &self.passwords
    }

    /// A fresh id for an IM message.
    pub fn next_chat_id(&self) -> i64 {
        self.chat_ids.next_id() as i64
    }

    /// Takes one of `uid`'s chat-message tokens; `false` when it has none.
    pub fn chat_allowed(&self, uid: &str) -> bool {
        self.chat_limiter.check(uid)
    }

    /// Takes one of `key`'s IM API tokens; `false` when it has none.
    pub fn api_allowed(&self, key: &str) -> bool {
        self.api_limiter.check(key)
    }

    /// The operator token of `/admin/broadcast`; empty: the route is off.
    pub fn admin_token(&self) -> &str {
        &self.admin_token
    }
}

/// The IM user id of a token subject: a positive integer (`alice` from
/// `/tk` is a room user, not an IM account).
pub fn im_uid(uid: &str) -> Result<i64, ApiError> {
    match uid.parse::<i64>() {
        Ok(id) if id > 0 && id.to_string() == uid => Ok(id),
        _ => Err(ApiError::NotImUser),
    }
}
