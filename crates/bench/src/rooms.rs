//! Who is where: the room of every session and every publisher, computed
//! the same way (deterministically, from the run's parameters) in the parent
//! and in every worker, so that expected deliveries can be known without
//! shipping membership lists around.
//!
//! Sessions are numbered `0..sessions` across the whole run. `uniform` puts
//! session `i` in room `i % rooms`; `single` puts everyone in room 0;
//! `zipf` gives room `k` (ranked from 0) a share proportional to
//! `1 / (k + 1)^s`, assigned by quantile so the counts are exact. Publisher
//! `j` publishes to room `j % rooms` (room 0 for `single`): in `zipf` the
//! busiest rooms get publishers first.

use serde::{Deserialize, Serialize};

use crate::error::BenchError;

/// How sessions are spread over rooms.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", tag = "kind")]
pub enum RoomDist {
    Uniform,
    Single,
    Zipf { s: f64 },
}

/// Room membership of sessions and publishers.
#[derive(Debug, Clone)]
pub struct RoomMap {
    sessions: u64,
    rooms: u32,
    dist: RoomDist,
    /// zipf only: cumulative share of rooms `0..=k`.
    cdf: Vec<f64>,
    pub_room: Vec<u32>,
    /// Publisher's index among the publishers of its room.
    pub_local: Vec<u32>,
    /// Publishers of each room, by global id.
    room_pubs: Vec<Vec<u32>>,
}

impl RoomMap {
    pub fn new(
        sessions: u64,
        rooms: u32,
        publishers: u32,
        dist: RoomDist,
    ) -> Result<Self, BenchError> {
        if rooms == 0 {
            return Err(BenchError::config("--rooms must be at least 1"));
        }
        let rooms = if dist == RoomDist::Single { 1 } else { rooms };
        let cdf = match dist {
            RoomDist::Zipf { s } => {
                if !(s.is_finite() && s >= 0.0) {
                    return Err(BenchError::config(
                        "zipf exponent must be a finite number >= 0",
                    ));
                }
                let w: Vec<f64> = (0..rooms).map(|k| 1.0 / f64::from(k + 1).powf(s)).collect();
                let total: f64 = w.iter().sum();
                let mut acc = 0.0;
                w.iter()
                    .map(|x| {
                        acc += x / total;
                        acc
                    })
                    .collect()
            }
            _ => Vec::new(),
        };
        let mut pub_room = Vec::with_capacity(publishers as usize);
        let mut pub_local = Vec::with_capacity(publishers as usize);
        let mut room_pubs = vec![Vec::new(); rooms as usize];
        for j in 0..publishers {
            let r = j % rooms;
            pub_room.push(r);
            pub_local.push(room_pubs[r as usize].len() as u32);
            room_pubs[r as usize].push(j);
        }
        Ok(RoomMap {
            sessions,
            rooms,
            dist,
            cdf,
            pub_room,
            pub_local,
            room_pubs,
        })
    }

    pub fn rooms(&self) -> u32 {
        self.rooms
    }

    pub fn sessions(&self) -> u64 {
        self.sessions
    }

    pub fn publishers(&self) -> u32 {
        self.pub_room.len() as u32
    }

    /// The room of session `i`.
    pub fn session_room(&self, i: u64) -> u32 {
        match self.dist {
            RoomDist::Single => 0,
            RoomDist::Uniform => (i % u64::from(self.rooms)) as u32,
            RoomDist::Zipf { .. } => {
                let q = (i as f64 + 0.5) / self.sessions.max(1) as f64;
                let k = self.cdf.partition_point(|&c| c < q);
                (k as u32).min(self.rooms - 1)
            }
        }
    }

    /// The room publisher `j` publishes to.
    pub fn publisher_room(&self, j: u32) -> u32 {
        self.pub_room[j as usize]
    }

    /// Publisher `j`'s index among its room's publishers, if `j` exists.
    pub fn publisher_local(&self, j: u32) -> Option<(u32, u32)> {
        let j = j as usize;
        Some((*self.pub_room.get(j)?, self.pub_local[j]))
    }

    /// The publishers of `room`, by global id.
    pub fn publishers_in(&self, room: u32) -> &[u32] {
        self.room_pubs
            .get(room as usize)
            .map(Vec::as_slice)
            .unwrap_or(&[])
    }

    /// Sessions in each room (for reports and tests).
    pub fn room_sizes(&self) -> Vec<u64> {
        let mut sizes = vec![0u64; self.rooms as usize];
        for i in 0..self.sessions {
            sizes[self.session_room(i) as usize] += 1;
        }
        sizes
    }
}

/// The name of room `r` on the wire (chatroom room id, NATS subject).
pub fn room_name(prefix: &str, r: u32) -> String {
    format!("{prefix}-{r}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uniform_and_single() {
        let m = RoomMap::new(10, 3, 4, RoomDist::Uniform).unwrap();
        assert_eq!(m.room_sizes(), vec![4, 3, 3]);
        assert_eq!(m.publisher_room(3), 0);
        assert_eq!(m.publishers_in(0), &[0, 3]);
        assert_eq!(m.publisher_local(3), Some((0, 1)));
        assert_eq!(m.publisher_local(4), None);
        let s = RoomMap::new(10, 7, 2, RoomDist::Single).unwrap();
        assert_eq!(s.rooms(), 1);
        assert_eq!(s.room_sizes(), vec![10]);
        assert_eq!(s.publishers_in(0), &[0, 1]);
        assert!(RoomMap::new(1, 0, 0, RoomDist::Uniform).is_err());
    }

    #[test]
    fn zipf_is_skewed_and_complete() {
        let m = RoomMap::new(10_000, 10, 3, RoomDist::Zipf { s: 1.0 }).unwrap();
        let sizes = m.room_sizes();
        assert_eq!(sizes.iter().sum::<u64>(), 10_000);
        assert!(sizes.windows(2).all(|w| w[0] >= w[1]), "{sizes:?}");
        // H(10) = 2.929: room 0 holds 1/H(10) = 34 % of the sessions.
        assert!((3400..=3430).contains(&sizes[0]), "{sizes:?}");
        assert!(sizes[9] > 0);
        // s = 0 is uniform.
        let flat = RoomMap::new(1000, 4, 0, RoomDist::Zipf { s: 0.0 }).unwrap();
        assert_eq!(flat.room_sizes(), vec![250; 4]);
        assert!(RoomMap::new(1, 2, 0, RoomDist::Zipf { s: f64::NAN }).is_err());
    }

    #[test]
    fn names() {
        assert_eq!(room_name("bench", 3), "bench-3");
    }
}
