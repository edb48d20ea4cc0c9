//! Room names with a meaning: community rooms (`c:<community id>`) carry IM
//! group messages and are joined only through membership, never by a
//! client naming them at sign-in.

/// Prefix reserved for community rooms.
pub const COMMUNITY_PREFIX: &str = "c:";

/// The room of community `id`.
pub fn community(id: i64) -> String {
    format!("{COMMUNITY_PREFIX}{id}")
}

/// True for names in the reserved community space.
pub fn is_community(room: &str) -> bool {
    room.starts_with(COMMUNITY_PREFIX)
}

#[cfg(test)]
mod tests {
    #[test]
    fn names() {
        assert_eq!(super::community(42), "c:42");
        assert!(super::is_community("c:42"));
        assert!(!super::is_community("lobby"));
    }
}
