//! IM messages: what a valid `ChatMsg` is, who may send it where, storing it
//! before delivery, and handing it to job as a `QueueMsg` — to the users'
//! conn nodes (1:1), to the community room (groups), or to everyone
//! (operator broadcast). Also the offline inbox (`Pending`/`AckPending`) and
//! the live room join after a user joins a community.

use chatroom_common::proto::protocol::{ChatAck, ChatCmd, ChatMsg, ChatStatus, Media, MsgLevel};
use chatroom_common::proto::queue::{BroadcastMsg, JoinMsg, QueueMsg, RoomMsg, UserMsg, queue_msg};
use chatroom_common::rooms;
use prost::Message;
use tracing::{debug, warn};

use crate::app::{App, im_uid};
use crate::config::ImConfig;
use crate::error::ApiError;
use crate::id::now_ms;
use crate::store::Store;

/// Largest integer JavaScript holds exactly.
pub const MAX_SAFE_INTEGER: i64 = (1 << 53) - 1;

/// Default and largest page of `Pending`.
const PENDING_DEFAULT: u32 = 100;
const PENDING_MAX: u32 = 1000;

/// A link a client may show: http(s) with a host, or one of our uploads.
pub fn check_url(im: &ImConfig, field: &str, v: &str) -> Result<(), ApiError> {
    let bad = || {
        ApiError::Invalid(format!(
            "{field} must be an http(s) URL or an uploaded file's URL"
        ))
    };
    if v.chars()
        .any(|c| c.is_whitespace() || c.is_control() || matches!(c, '"' | '<' | '>' | '\\' | '`'))
    {
        return Err(bad());
    }
    let lower = v.get(..8).unwrap_or(v).to_ascii_lowercase();
    let rest = if lower.starts_with("https://") {
        &v[8..]
    } else if lower.starts_with("http://") {
        &v[7..]
    } else if im.upload_url.starts_with('/') {
        return match v.strip_prefix(im.upload_url.as_str()) {
            Some(name) if super::upload::valid_stored_name(name) => Ok(()),
            _ => Err(bad()),
        };
    } else {
        return Err(bad());
    };
    match rest.split(['/', '?', '#']).next() {
        Some(host) if !host.is_empty() => Ok(()),
        _ => Err(bad()),
    }
}

/// Size limits, then the fields each media type needs.
pub fn check_fields(im: &ImConfig, m: &ChatMsg) -> Result<(), ApiError> {
    let too_large =
        |field: &str, max: usize| ApiError::TooLarge(format!("{field} is larger than {max} bytes"));
    if m.content.len() > im.max_content_bytes {
        return Err(too_large("content", im.max_content_bytes));
    }
    if m.url.len() > im.max_url_bytes {
        return Err(too_large("url", im.max_url_bytes));
    }
    if m.pic.len() > im.max_url_bytes {
        return Err(too_large("pic", im.max_url_bytes));
    }
    if m.memo.len() > im.max_memo_bytes {
        return Err(too_large("memo", im.max_memo_bytes));
    }
    if !(0..=MAX_SAFE_INTEGER).contains(&m.amount) {
        return Err(ApiError::Invalid(format!(
            "amount must be 0..={MAX_SAFE_INTEGER}"
        )));
    }
    if !m.url.is_empty() {
        check_url(im, "url", &m.url)?;
    }
    if !m.pic.is_empty() {
        check_url(im, "pic", &m.pic)?;
    }
    let has_content = !m.content.trim().is_empty();
    let has_url = !m.url.is_empty();
    let need = |ok: bool, what: &str| {
        if ok {
            Ok(())
        } else {
            Err(ApiError::Invalid(format!("media {} needs {what}", m.media)))
        }
    };
    match Media::try_from(m.media) {
        Ok(Media::Text) => need(has_content, "content"),
        Ok(Media::News) => need(has_content && has_url, "content (the title) and url"),
        Ok(Media::Voice) => need(has_url && m.amount > 0, "url and amount (seconds) > 0"),
        Ok(Media::Image) => need(has_url, "url"),
        Ok(Media::RedPacket) => need(m.amount > 0, "amount (cents) > 0"),
        Ok(Media::Emoji) => need(has_content, "content"),
        Ok(Media::Link) => need(has_url, "url"),
        Ok(Media::Video) => need(has_url, "url"),
        Ok(Media::Contact) => need(has_content, "content"),
        Ok(Media::UserDefined) => need(has_content || has_url, "content or url"),
        Ok(Media::None) | Err(_) => Err(ApiError::Invalid(format!("unknown media {}", m.media))),
    }
}

/// Accepts a message from signed-in user `uid`: checks it, stores it, starts
/// its delivery; answers the ack for the sender's session.
pub async fn send(app: &App, uid: &str, msg: ChatMsg) -> Result<ChatAck, ApiError> {
    let sender = im_uid(uid)?;
    if !app.im.chat_allowed(uid) {
        return Err(ApiError::RateLimited);
    }
    match ChatCmd::try_from(msg.cmd) {
        Ok(ChatCmd::Single | ChatCmd::Community) => {}
        Ok(ChatCmd::Broadcast) => {
            return Err(ApiError::Forbidden(
                "cmd 12 (broadcast) is for operators only".into(),
            ));
        }
        Ok(ChatCmd::Heartbeat | ChatCmd::Ack | ChatCmd::Error | ChatCmd::Welcome) | Err(_) => {
            return Err(ApiError::Invalid(format!("unknown cmd {}", msg.cmd)));
        }
    }
    if msg.dstid <= 0 {
        return Err(ApiError::Invalid("dstid must be a positive id".into()));
    }
    check_fields(app.im.cfg(), &msg)?;
    let client_id = msg.id;
    let mut m = ChatMsg {
        id: 0,
        userid: sender,
        created_ms: 0,
        ..msg
    };
    let status = if m.cmd == ChatCmd::Single as i32 {
        send_single(app, &mut m).await?
    } else {
        send_community(app, &mut m).await?
    };
    debug!(
        id = m.id,
        cmd = m.cmd,
        dst = m.dstid,
        ?status,
        "chat message accepted"
    );
    Ok(ChatAck {
        id: m.id,
        client_id,
        dstid: m.dstid,
        cmd: m.cmd,
        status: status as i32,
        created_ms: m.created_ms,
    })
}

async fn send_single(app: &App, m: &mut ChatMsg) -> Result<ChatStatus, ApiError> {
    let (sender, dst) = (m.userid, m.dstid);
    if !app.im.store().is_friend(sender, dst).await? {
        return Err(ApiError::Forbidden(
            "you can only send messages to your friends".into(),
        ));
    }
    let (s, d) = (sender.to_string(), dst.to_string());
    let mut servers = app
        .rooms
        .presence()
        .servers_of_many(&[d.clone(), s.clone()])
        .await?;
    let sender_servers = servers.pop().unwrap_or_default();
    let mut dst_servers = servers.pop().unwrap_or_default();
    let offline = dst_servers.is_empty();
    let inbox = if offline { vec![dst] } else { Vec::new() };
    store(app, m, &inbox).await?;
    if offline {
        // The recipient may have signed in (and fetched its inbox) between
        // the look-up and the insert: look again so the message is not left
        // waiting for the next sign-in. At worst it arrives twice, with the
        // same id.
        dst_servers = app
            .rooms
            .presence()
            .servers_of(&d)
            .await
            .unwrap_or_default();
    }
    let (uids, status) = if dst_servers.is_empty() {
        (vec![s], ChatStatus::Stored)
    } else {
        (vec![d, s], ChatStatus::Delivered)
    };
    let mut all = dst_servers;
    all.extend(sender_servers);
    all.sort();
    all.dedup();
    if all.is_empty() {
        // Nobody to push to (the sender's session is on a conn node that is
        // not in presence any more); the message is stored.
        return Ok(status);
    }
    let q = QueueMsg {
        body: Some(queue_msg::Body::User(UserMsg {
            uids,
            servers: all,
            msg: Some(m.clone()),
        })),
    };
    publish_or_undo(app, m.id, q).await?;
    Ok(status)
}

async fn send_community(app: &App, m: &mut ChatMsg) -> Result<ChatStatus, ApiError> {
    let (sender, community) = (m.userid, m.dstid);
    if !app.im.store().is_member(sender, community).await? {
        return Err(ApiError::Forbidden(
            "you can only send messages to communities you have joined".into(),
        ));
    }
    let others: Vec<i64> = app
        .im
        .store()
        .members(community)
        .await?
        .into_iter()
        .filter(|u| *u != sender)
        .collect();
    let names: Vec<String> = others.iter().map(i64::to_string).collect();
    let servers = app.rooms.presence().servers_of_many(&names).await?;
    let offline: Vec<i64> = others
        .iter()
        .zip(&servers)
        .filter(|(_, s)| s.is_empty())
        .map(|(u, _)| *u)
        .collect();
    let status = if offline.len() < others.len() {
        ChatStatus::Delivered
    } else {
        ChatStatus::Stored
    };
    store(app, m, &offline).await?;
    let q = QueueMsg {
        body: Some(queue_msg::Body::Room(RoomMsg {
            id: m.id as u64,
            room_id: rooms::community(community),
            level: MsgLevel::Important as i32,
            data: m.encode_to_vec().into(),
            uid: sender.to_string(),
            ts_ms: m.created_ms,
            chat: true,
            ..Default::default()
        })),
    };
    publish_or_undo(app, m.id, q).await?;
    Ok(status)
}

/// Gives the message its id and time and stores it (with inbox rows for
/// `inbox`). Two logic nodes sharing a node number could make the same id:
/// the database refuses the second, which is retried with a fresh one.
async fn store(app: &App, m: &mut ChatMsg, inbox: &[i64]) -> Result<(), ApiError> {
    let mut attempt = 0;
    loop {
        m.id = app.im.next_chat_id();
        m.created_ms = now_ms() as i64;
        match app.im.store().insert_message(m, inbox).await {
            Ok(()) => return Ok(()),
            Err(e) if Store::is_duplicate_id(&e) && attempt < 3 => {
                warn!(
                    id = m.id,
                    "message id already taken (is id_node shared?); retrying"
                );
                attempt += 1;
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// Publishes; if the queue refuses, the stored message is taken back so the
/// sender can simply retry.
async fn publish_or_undo(app: &App, id: i64, q: QueueMsg) -> Result<(), ApiError> {
    if let Err(e) = app.rooms.enqueue(q).await {
        if let Err(undo) = app.im.store().delete_message(id).await {
            warn!(id, error = %undo, "could not take back an undelivered message");
        }
        return Err(e);
    }
    Ok(())
}

/// Up to `limit` (0: a default) of a user's inbox messages, oldest first,
/// and whether there are more. Non-IM users have none.
pub async fn pending(app: &App, uid: &str, limit: u32) -> Result<(Vec<ChatMsg>, bool), ApiError> {
    let Ok(uid) = im_uid(uid) else {
        return Ok((Vec::new(), false));
    };
    let limit = match limit {
        0 => PENDING_DEFAULT,
        n => n.min(PENDING_MAX),
    };
    let mut msgs = app.im.store().pending(uid, limit + 1).await?;
    let more = msgs.len() > limit as usize;
    msgs.truncate(limit as usize);
    Ok((msgs, more))
}

/// Removes a user's inbox messages up to `upto`.
pub async fn ack_pending(app: &App, uid: &str, upto: i64) -> Result<u64, ApiError> {
    let Ok(uid) = im_uid(uid) else {
        return Ok(0);
    };
    Ok(app.im.store().ack_pending(uid, upto).await?)
}

/// Messages a conn node could not hand to `uid` (it has no session for it
/// any more): into the inbox, unless the user is online on another node,
/// which got them too. Answers how many were stored.
pub async fn undelivered(app: &App, server: &str, uid: &str, ids: &[i64]) -> Result<u64, ApiError> {
    let Ok(id) = im_uid(uid) else {
        return Ok(0);
    };
    let elsewhere = app
        .rooms
        .presence()
        .servers_of(uid)
        .await?
        .into_iter()
        .any(|s| s != server);
    if elsewhere {
        return Ok(0);
    }
    Ok(app.im.store().add_inbox(id, ids).await?)
}

/// An operator broadcast to every session (not stored: it is not part of
/// any conversation). Answers the message as sent.
pub async fn broadcast(app: &App, msg: ChatMsg) -> Result<ChatMsg, ApiError> {
    let m = ChatMsg {
        id: app.im.next_chat_id(),
        userid: 0,
        dstid: 0,
        cmd: ChatCmd::Broadcast.into(),
        created_ms: now_ms() as i64,
        ..msg
    };
    check_fields(app.im.cfg(), &m)?;
    app.rooms
        .enqueue(QueueMsg {
            body: Some(queue_msg::Body::Broadcast(BroadcastMsg {
                msg: Some(m.clone()),
            })),
        })
        .await?;
    Ok(m)
}

/// After a user joined community `id`: its live sessions join the room now.
/// Best effort (the membership is committed; the next sign-in joins anyway).
pub async fn announce_join(app: &App, uid: i64, id: i64) {
    let servers = match app.rooms.presence().servers_of(&uid.to_string()).await {
        Ok(s) => s,
        Err(e) => {
            warn!(uid, community = id, error = %e, "presence look-up for a join failed");
            return;
        }
    };
    if servers.is_empty() {
        return;
    }
    let q = QueueMsg {
        body: Some(queue_msg::Body::Join(JoinMsg {
            uid: uid.to_string(),
            room: rooms::community(id),
            servers,
        })),
    };
    if let Err(e) = app.rooms.enqueue(q).await {
        warn!(uid, community = id, reason = %e, "join could not be published");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chatroom_common::config::Load;

    fn im() -> ImConfig {
        crate::LogicConfig::from_overrides([]).expect("defaults").im
    }

    fn msg(media: i32) -> ChatMsg {
        ChatMsg {
            cmd: ChatCmd::Single.into(),
            dstid: 2,
            media,
            ..ChatMsg::default()
        }
    }

    #[test]
    fn urls() {
        let im = im();
        for ok in [
            "http://a.com/x.png",
            "https://a.com",
            "HTTPS://a.com/?q=1",
            "/attach/files/0123456789abcdef0123456789abcdef.png",
        ] {
            assert!(check_url(&im, "url", ok).is_ok(), "{ok}");
        }
        for bad in [
            "javascript:alert(1)",
            "data:text/html,x",
            "ftp://a.com",
            "http://",
            "https:///x",
            "/etc/passwd",
            "/attach/files/../../etc/passwd",
            "/attach/files/x.png",
            "http://a.com/ x",
            "http://a.com/\"onerror=",
            "",
        ] {
            assert!(check_url(&im, "url", bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn every_media_needs_its_fields() {
        let im = im();
        let url = "https://a.com/f".to_string();
        let cases: Vec<(ChatMsg, bool)> = vec![
            (msg(Media::Text.into()), false),
            (
                ChatMsg {
                    content: "  ".into(),
                    ..msg(Media::Text.into())
                },
                false,
            ),
            (
                ChatMsg {
                    content: "hi".into(),
                    ..msg(Media::Text.into())
                },
                true,
            ),
            (
                ChatMsg {
                    content: "t".into(),
                    ..msg(Media::News.into())
                },
                false,
            ),
            (
                ChatMsg {
                    content: "t".into(),
                    url: url.clone(),
                    ..msg(Media::News.into())
                },
                true,
            ),
            (
                ChatMsg {
                    url: url.clone(),
                    ..msg(Media::Voice.into())
                },
                false,
            ),
            (
                ChatMsg {
                    url: url.clone(),
                    amount: 3,
                    ..msg(Media::Voice.into())
                },
                true,
            ),
            (msg(Media::Image.into()), false),
            (
                ChatMsg {
                    url: url.clone(),
                    ..msg(Media::Image.into())
                },
                true,
            ),
            (
                ChatMsg {
                    url: url.clone(),
                    ..msg(Media::RedPacket.into())
                },
                false,
            ),
            (
                ChatMsg {
                    amount: 300,
                    ..msg(Media::RedPacket.into())
                },
                true,
            ),
            (msg(Media::Emoji.into()), false),
            (
                ChatMsg {
                    content: "cry".into(),
                    ..msg(Media::Emoji.into())
                },
                true,
            ),
            (msg(Media::Link.into()), false),
            (
                ChatMsg {
                    url: url.clone(),
                    ..msg(Media::Link.into())
                },
                true,
            ),
            (
                ChatMsg {
                    pic: url.clone(),
                    ..msg(Media::Video.into())
                },
                false,
            ),
            (
                ChatMsg {
                    url: url.clone(),
                    ..msg(Media::Video.into())
                },
                true,
            ),
            (msg(Media::Contact.into()), false),
            (
                ChatMsg {
                    content: "10086".into(),
                    ..msg(Media::Contact.into())
                },
                true,
            ),
            (msg(Media::UserDefined.into()), false),
            (
                ChatMsg {
                    url: url.clone(),
                    ..msg(Media::UserDefined.into())
                },
                true,
            ),
            (
                ChatMsg {
                    content: "x".into(),
                    ..msg(7777)
                },
                false,
            ),
            (
                ChatMsg {
                    content: "x".into(),
                    amount: -1,
                    ..msg(Media::Text.into())
                },
                false,
            ),
            (
                ChatMsg {
                    content: "x".into(),
                    pic: "javascript:x".into(),
                    ..msg(Media::Text.into())
                },
                false,
            ),
        ];
        for (m, ok) in cases {
            assert_eq!(check_fields(&im, &m).is_ok(), ok, "{m:?}");
        }
    }

    #[test]
    fn oversize_fields_are_413() {
        let im = im();
        let big = "x".repeat(im.max_content_bytes + 1);
        let e = check_fields(
            &im,
            &ChatMsg {
                content: big,
                ..msg(Media::Text.into())
            },
        )
        .unwrap_err();
        assert!(matches!(e, ApiError::TooLarge(_)), "{e}");
        assert_eq!(e.client_code(), 413);
        assert!(e.to_string().contains("content"), "{e}");
    }
}
