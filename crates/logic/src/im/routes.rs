//! The IM seed's HTTP routes: accounts (`/user/*`), friends and communities
//! (`/contact/*`), conversation history (`/chat/history`) and the operator
//! broadcast (`/admin/broadcast`).
//!
//! Bodies are urlencoded forms (what the seed's pages post) or JSON; query
//! fields count too. Replies follow the seed: `{code: 0, msg: "ok", data}` or
//! `{code: 0, msg: "ok", rows, total}`, and `{code: <non-zero>, msg}` on
//! failure, with the matching HTTP status. The acting user is always the
//! token's (header `Authorization`, or a `token` field); a `userid` field
//! that names someone else is refused.

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::http::header::AUTHORIZATION;
use axum::routing::post;
use chatroom_common::proto::protocol::ChatMsg;
use serde::Serialize;
use tracing::{Span, info};

use super::Acting;
use super::chat::{self, check_url};
use crate::app::App;
use crate::body::Params;
use crate::error::{ApiError, ImReply, ImResult};
use crate::store::{NewCommunity, NewUser, User, conv_key};
use chatroom_common::chat::ChatJson;
use chatroom_common::proto::protocol::ChatCmd;

pub fn routes() -> Router<Arc<App>> {
    Router::new()
        .route("/user/register", post(register))
        .route("/user/login", post(login))
        .route("/user/find", post(find))
        .route("/contact/addfriend", post(add_friend))
        .route("/contact/friend", post(friends))
        .route("/contact/loadfriend", post(friends))
        .route("/contact/createcommunity", post(create_community))
        .route("/contact/community", post(communities))
        .route("/contact/loadcommunity", post(communities))
        .route("/contact/joincommunity", post(join_community))
        .route("/chat/history", post(history))
        .route("/admin/broadcast", post(admin_broadcast))
}

/// Another user as anyone may see them (no mobile number, never the hash).
#[derive(Debug, Serialize)]
pub struct PublicUser {
    pub id: i64,
    pub nickname: String,
    pub avatar: String,
    pub memo: String,
    pub created_ms: i64,
}

impl From<User> for PublicUser {
    fn from(u: User) -> Self {
        PublicUser {
            id: u.id,
            nickname: u.nickname,
            avatar: u.avatar,
            memo: u.memo,
            created_ms: u.created_ms,
        }
    }
}

/// `/user/login`'s data: the user, and the token for `/chat` and these routes.
#[derive(Debug, Serialize)]
pub struct Login {
    #[serde(flatten)]
    pub user: User,
    pub token: String,
}

/// A text field of at most `max` characters, without control characters
/// (`multiline` allows line breaks).
fn short_text(p: &Params, key: &str, max: usize) -> Result<String, ApiError> {
    let v = p.get(key).unwrap_or("").trim().to_string();
    if v.chars().count() > max {
        return Err(ApiError::TooLarge(format!(
            "{key} is longer than {max} characters"
        )));
    }
    if v.chars().any(|c| c.is_control() && c != '\n') {
        return Err(ApiError::Invalid(format!(
            "{key} contains control characters"
        )));
    }
    Ok(v)
}

fn optional_url(app: &App, p: &Params, keys: &[&str]) -> Result<String, ApiError> {
    for key in keys {
        let v = p.get(key).unwrap_or("").trim();
        if !v.is_empty() {
            if v.len() > app.im.cfg().max_url_bytes {
                return Err(ApiError::TooLarge(format!(
                    "{key} is larger than {} bytes",
                    app.im.cfg().max_url_bytes
                )));
            }
            check_url(app.im.cfg(), key, v)?;
            return Ok(v.to_string());
        }
    }
    Ok(String::new())
}

fn required_id(p: &Params, key: &str) -> Result<i64, ApiError> {
    match p.int(key)? {
        Some(id) if id > 0 => Ok(id),
        Some(_) => Err(ApiError::Invalid(format!("{key} must be a positive id"))),
        None => Err(ApiError::Invalid(format!("{key} is missing"))),
    }
}

// ---------------------------------------------------------------- users

#[tracing::instrument(name = "http.register", skip_all, fields(uid))]
async fn register(State(app): State<Arc<App>>, p: Result<Params, ApiError>) -> ImResult<User> {
    let app: &App = &app;
    let p = p?;
    let mobile = p.get("mobile").unwrap_or("").trim().to_string();
    if mobile.is_empty()
        || mobile.chars().count() > 32
        || mobile.chars().any(|c| c.is_whitespace() || c.is_control())
    {
        return Err(
            ApiError::Invalid("mobile must be 1-32 characters without spaces".into()).into(),
        );
    }
    if !app.im.api_allowed(&format!("mobile:{mobile}")) {
        return Err(ApiError::RateLimited.into());
    }
    let passwd = p.get("passwd").unwrap_or("").to_string();
    if !(6..=128).contains(&passwd.chars().count()) {
        return Err(ApiError::Invalid("passwd must be 6-128 characters".into()).into());
    }
    let mut nickname = short_text(&p, "nickname", 32)?;
    if nickname.is_empty() {
        nickname = mobile.clone();
    }
    let avatar = optional_url(app, &p, &["avatar"])?;
    let memo = short_text(&p, "memo", 256)?;
    if app.im.store().user_by_mobile(&mobile).await?.is_some() {
        return Err(crate::store::StoreError::MobileTaken.into());
    }
    let passwd_hash = app.im.passwords().hash(passwd).await?;
    let user = app
        .im
        .store()
        .create_user(&NewUser {
            mobile,
            passwd_hash,
            nickname,
            avatar,
            memo,
        })
        .await?;
    Span::current().record("uid", user.id);
    info!("user registered");
    Ok(ImReply::data(user))
}

#[tracing::instrument(name = "http.login", skip_all, fields(uid))]
async fn login(State(app): State<Arc<App>>, p: Result<Params, ApiError>) -> ImResult<Login> {
    let app: &App = &app;
    let p = p?;
    let mobile = p.get("mobile").unwrap_or("").trim().to_string();
    let passwd = p.get("passwd").unwrap_or("").to_string();
    if mobile.is_empty() || passwd.is_empty() {
        return Err(ApiError::Invalid("mobile and passwd are required".into()).into());
    }
    if mobile.len() > 128 || passwd.len() > 1024 {
        return Err(ApiError::BadCredentials.into());
    }
    // Slows password guessing against one account, whoever guesses.
    if !app.im.api_allowed(&format!("mobile:{mobile}")) {
        return Err(ApiError::RateLimited.into());
    }
    let Some((user, hash)) = app.im.store().credentials(&mobile).await? else {
        return Err(ApiError::BadCredentials.into());
    };
    if !app.im.passwords().verify(passwd, hash).await? {
        return Err(ApiError::BadCredentials.into());
    }
    let token = app.auth.issue(&user.id.to_string())?;
    Span::current().record("uid", user.id);
    info!("user logged in");
    Ok(ImReply::data(Login { user, token }))
}

#[tracing::instrument(name = "http.find", skip_all, fields(uid))]
async fn find(State(app): State<Arc<App>>, who: Acting) -> ImResult<PublicUser> {
    let app: &App = &app;
    let (_, p) = who.in_span();
    let user = if let Some(id) = p.int("id")?.or(p.int("dstid")?) {
        app.im.store().user(id).await?
    } else {
        match p.get("mobile").map(str::trim).filter(|m| !m.is_empty()) {
            Some(mobile) => app.im.store().user_by_mobile(mobile).await?,
            None => return Err(ApiError::Invalid("give id or mobile".into()).into()),
        }
    };
    let user = user.ok_or_else(|| ApiError::Missing("no such user".into()))?;
    Ok(ImReply::data(user.into()))
}

// ---------------------------------------------------------------- contacts

#[tracing::instrument(name = "http.addfriend", skip_all, fields(uid))]
async fn add_friend(State(app): State<Arc<App>>, who: Acting) -> ImResult<PublicUser> {
    let app: &App = &app;
    let (uid, p) = who.in_span();
    let dst = required_id(&p, "dstid")?;
    let friend = app.im.store().add_friend(uid, dst).await?;
    info!(friend = dst, "friend added");
    Ok(ImReply::data(friend.into()))
}

#[tracing::instrument(name = "http.friends", skip_all, fields(uid))]
async fn friends(State(app): State<Arc<App>>, who: Acting) -> ImResult<PublicUser> {
    let app: &App = &app;
    let (uid, _) = who.in_span();
    let rows = app.im.store().friends(uid).await?;
    Ok(ImReply::rows(rows.into_iter().map(Into::into).collect()))
}

#[tracing::instrument(name = "http.createcommunity", skip_all, fields(uid))]
async fn create_community(
    State(app): State<Arc<App>>,
    who: Acting,
) -> ImResult<crate::store::Community> {
    let app: &App = &app;
    let (uid, p) = who.in_span();
    let name = short_text(&p, "name", 64)?;
    if name.is_empty() {
        return Err(ApiError::Invalid("name is required".into()).into());
    }
    let icon = optional_url(app, &p, &["icon", "pic"])?;
    let memo = short_text(&p, "memo", 256)?;
    let kind = p.int("kind")?.or(p.int("cate")?).unwrap_or(0);
    if !(0..=1000).contains(&kind) {
        return Err(ApiError::Invalid("kind must be 0..=1000".into()).into());
    }
    let c = app
        .im
        .store()
        .create_community(
            &NewCommunity {
                name,
                owner: uid,
                icon,
                memo,
                kind,
            },
            app.im.cfg().max_owned_communities,
        )
        .await?;
    info!(community = c.id, "community created");
    chat::announce_join(app, uid, c.id).await;
    Ok(ImReply::data(c))
}

#[tracing::instrument(name = "http.communities", skip_all, fields(uid))]
async fn communities(
    State(app): State<Arc<App>>,
    who: Acting,
) -> ImResult<crate::store::Community> {
    let app: &App = &app;
    let (uid, _) = who.in_span();
    Ok(ImReply::rows(app.im.store().communities_of(uid).await?))
}

#[tracing::instrument(name = "http.joincommunity", skip_all, fields(uid))]
async fn join_community(
    State(app): State<Arc<App>>,
    who: Acting,
) -> ImResult<crate::store::Community> {
    let app: &App = &app;
    let (uid, p) = who.in_span();
    let id = required_id(&p, "dstid")?;
    let c = app.im.store().join_community(uid, id).await?;
    info!(community = id, "community joined");
    chat::announce_join(app, uid, id).await;
    Ok(ImReply::data(c))
}

// ---------------------------------------------------------------- history

#[tracing::instrument(name = "http.history", skip_all, fields(uid))]
async fn history(State(app): State<Arc<App>>, who: Acting) -> ImResult<ChatJson> {
    let app: &App = &app;
    let (uid, p) = who.in_span();
    let dst = required_id(&p, "dstid")?;
    let cmd = p.int("cmd")?.unwrap_or(i64::from(ChatCmd::Single as i32));
    let cmd = match i32::try_from(cmd).map(ChatCmd::try_from) {
        Ok(Ok(c @ (ChatCmd::Single | ChatCmd::Community))) => c as i32,
        _ => {
            return Err(ApiError::Invalid("cmd must be 10 (user) or 11 (community)".into()).into());
        }
    };
    let before = match p.int("before")? {
        None | Some(0) => i64::MAX,
        Some(b) if b > 0 => b,
        Some(_) => return Err(ApiError::Invalid("before must be a message id".into()).into()),
    };
    let limit = p.int("limit")?.unwrap_or(20).clamp(1, 100) as u32;
    if cmd == ChatCmd::Community as i32 && !app.im.store().is_member(uid, dst).await? {
        return Err(
            ApiError::Forbidden("only members can read a community's history".into()).into(),
        );
    }
    let msgs = app
        .im
        .store()
        .history(&conv_key(cmd, uid, dst), before, limit)
        .await?;
    Ok(ImReply::rows(msgs.into_iter().map(Into::into).collect()))
}

// ---------------------------------------------------------------- admin

/// Compares without leaking where the first difference is.
fn same_secret(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[tracing::instrument(name = "http.admin_broadcast", skip_all)]
async fn admin_broadcast(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    p: Result<Params, ApiError>,
) -> ImResult<ChatJson> {
    let app: &App = &app;
    let headers = &headers;
    if app.im.admin_token().is_empty() {
        return Err(ApiError::NotFound.into());
    }
    let given = headers
        .get(AUTHORIZATION)
        .map(|v| v.as_bytes())
        .unwrap_or_default();
    let given = given.strip_prefix(b"Bearer ").unwrap_or(given);
    if !same_secret(given, app.im.admin_token().as_bytes()) {
        return Err(ApiError::AdminAuth.into());
    }
    let p = p?;
    let media = p.int("media")?.unwrap_or(1);
    let msg = ChatMsg {
        media: i32::try_from(media)
            .map_err(|_| ApiError::Invalid(format!("unknown media {media}")))?,
        content: p.get("content").unwrap_or("").to_string(),
        pic: p.get("pic").unwrap_or("").to_string(),
        url: p.get("url").unwrap_or("").to_string(),
        memo: p.get("memo").unwrap_or("").to_string(),
        amount: p.int("amount")?.unwrap_or(0),
        ..ChatMsg::default()
    };
    let sent = chat::broadcast(app, msg).await?;
    info!(id = sent.id, "operator broadcast published");
    Ok(ImReply::data(sent.into()))
}

#[cfg(test)]
mod tests {
    #[test]
    fn secrets() {
        assert!(super::same_secret(b"abc", b"abc"));
        assert!(!super::same_secret(b"abc", b"abd"));
        assert!(!super::same_secret(b"abc", b"abcd"));
        assert!(!super::same_secret(b"", b"a"));
    }
}
