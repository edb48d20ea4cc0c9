//! Joining a `/room` session to its room's stream at sign-in, and recovery
//! after a reconnect: a client that signs in with the epoch and the last
//! offset it saw gets the messages it missed first — from this node's
//! stream, or from logic's history for what the stream no longer holds (or
//! never had: a client that moved here from another node) — then the live
//! ones, with no gap and no duplicate. The sign-in answer says whether
//! everything could be recovered (`recovered`), so a client can reload.

use std::sync::Arc;

use bytes::Bytes;
use chatroom_common::proto::logic::{RoomHistoryEntry, RoomHistoryReq};
use chatroom_common::proto::protocol::MsgLevel;
use tracing::{info, warn};

use super::Resume;
use super::edge::Edge;
use crate::Ctx;
use crate::frame;
use crate::room::{Cursor, Outbound};
use crate::stream::{Entry, RoomStream, frames_of};

/// Most messages asked of logic per call (it also pages by bytes).
const PAGE: u32 = 4096;
/// Most messages one recovery takes from logic; a client further behind
/// is told it could not recover everything.
pub const MAX_RECOVER: usize = 65_536;

/// Logic's history of a room from `after` (exclusive) to `until`
/// (inclusive; 0: the newest), paged.
struct History {
    epoch: u64,
    last_offset: u64,
    /// Nothing from `after` on is missing, up to `until` or the newest.
    complete: bool,
    entries: Vec<Entry>,
}

async fn fetch(
    ctx: &Ctx,
    room: &str,
    epoch: u64,
    after: u64,
    until: u64,
) -> Result<History, tonic::Status> {
    let mut h = History {
        epoch: 0,
        last_offset: 0,
        complete: true,
        entries: Vec::new(),
    };
    let mut cursor = after;
    loop {
        let req = RoomHistoryReq {
            room_id: room.to_string(),
            epoch,
            after_offset: cursor,
            until_offset: until,
            limit: PAGE,
        };
        let page = ctx.logic.room_history(req).await?;
        h.epoch = page.epoch;
        h.last_offset = page.last_offset;
        h.complete &= page.complete;
        if page.epoch != epoch || page.entries.is_empty() {
            return Ok(h);
        }
        cursor = page.entries.last().map_or(cursor, |e| e.offset);
        h.entries.extend(entries(page.entries));
        let end = if until == 0 { page.last_offset } else { until };
        if cursor >= end {
            return Ok(h);
        }
        if h.entries.len() >= MAX_RECOVER {
            h.complete = false;
            return Ok(h);
        }
    }
}

/// Where a joining session starts, and what it is sent first.
struct Plan {
    /// For the answer: the stream's epoch and newest offset.
    epoch: u64,
    offset: u64,
    recovered: bool,
    /// Missed messages from logic's history, as merged frames.
    frames: Vec<Bytes>,
    cursor: Cursor,
}

/// Joins the session to `room`'s stream; answers the sign-in, sends what
/// it recovered, then hands the writer its cursor. The stream is returned
/// even when sending failed (the caller leaves it).
pub(super) async fn join(
    ctx: &Ctx,
    edge: &Edge,
    room: &str,
    resume: Resume,
) -> (Arc<RoomStream>, Result<(), ()>) {
    let stream = ctx.streams.subscribe(room);
    let plan = plan(ctx, &stream, room, resume).await;
    if resume.epoch != 0 {
        info!(
            epoch = resume.epoch,
            since = resume.since,
            recovered = plan.recovered,
            from_logic = plan.frames.len(),
            "recovery after reconnect"
        );
    }
    let sent = async {
        edge.binary(frame::signed_in(plan.epoch, plan.offset, plan.recovered))
            .await?;
        for f in plan.frames {
            edge.binary(f).await?;
        }
        edge.out(Outbound::Subscribe(plan.cursor)).await
    }
    .await;
    (stream, sent)
}

async fn plan(ctx: &Ctx, stream: &Arc<RoomStream>, room: &str, resume: Resume) -> Plan {
    let (s_epoch, first, next) = stream.span();
    let live = |epoch: u64, offset: u64| Plan {
        epoch,
        offset,
        recovered: false,
        frames: Vec::new(),
        cursor: Cursor {
            stream: stream.clone(),
            epoch: s_epoch,
            next,
        },
    };
    if resume.epoch == 0 {
        return live(s_epoch, next - 1);
    }
    if s_epoch == resume.epoch && resume.since + 1 >= first {
        // Everything missed is still in this node's stream.
        let mut p = live(s_epoch, next - 1);
        p.recovered = true;
        p.cursor.next = (resume.since + 1).min(next);
        return p;
    }
    // What the stream does not hold comes from logic.
    let until = if s_epoch == resume.epoch {
        first - 1
    } else {
        0
    };
    let h = match fetch(ctx, room, resume.epoch, resume.since, until).await {
        Ok(h) => h,
        Err(e) => {
            warn!(error = %e.message(), "room history unavailable; the session starts live");
            return live(s_epoch, next - 1);
        }
    };
    if h.epoch == 0 || h.epoch != resume.epoch {
        // The stream restarted since: offsets are not comparable.
        let epoch = if s_epoch != 0 { s_epoch } else { h.epoch };
        return live(epoch, next - 1);
    }
    let got_to = h.entries.last().map_or(resume.since, |e| e.offset);
    let frames = frames_of(&ctx.streams.cfg, room, h.epoch, &h.entries);
    if s_epoch == resume.epoch {
        // History fills (since, first); the stream goes on from first.
        Plan {
            epoch: s_epoch,
            offset: next - 1,
            recovered: h.complete && got_to + 1 >= first,
            frames,
            cursor: Cursor {
                stream: stream.clone(),
                epoch: s_epoch,
                next: first,
            },
        }
    } else {
        // This node's stream has not seen the epoch (a client moved here
        // from another node): what logic had, then the stream from there.
        stream.expect(&ctx.streams.cfg, h.epoch, got_to + 1);
        Plan {
            epoch: h.epoch,
            offset: h.last_offset,
            recovered: h.complete && got_to >= h.last_offset,
            frames,
            cursor: Cursor {
                stream: stream.clone(),
                epoch: h.epoch,
                next: got_to + 1,
            },
        }
    }
}

fn entries(history: Vec<RoomHistoryEntry>) -> Vec<Entry> {
    history
        .into_iter()
        .map(|e| Entry {
            offset: e.offset,
            level: MsgLevel::try_from(e.level).unwrap_or(MsgLevel::Normal),
            data: e.data,
        })
        .collect()
}

/// Messages `from..next` of `room` in `epoch` from logic's history, for a
/// writer whose session fell behind the stream past an IMPORTANT message.
/// `None` when logic could not give all of them.
pub(super) async fn gap(
    ctx: &Ctx,
    room: &str,
    epoch: u64,
    from: u64,
    next: u64,
) -> Option<Vec<Bytes>> {
    match fetch(ctx, room, epoch, from - 1, next - 1).await {
        Ok(h)
            if h.epoch == epoch
                && h.complete
                && h.entries.last().is_some_and(|e| e.offset + 1 >= next) =>
        {
            Some(frames_of(&ctx.streams.cfg, room, epoch, &h.entries))
        }
        Ok(_) => None,
        Err(e) => {
            warn!(error = %e.message(), "room history unavailable for a session behind");
            None
        }
    }
}
