//! Who a client is and where its directory is: the rules that keep a mirror from swallowing
//! its own source (nested roots) and from silently switching to another client's tree.
//!
//! Pure decisions only; reading directories and state files is the store's job.

use std::fmt;
use std::str::FromStr;

/// A client's identity: a random 128-bit value made on its first run and kept in its state
/// directory. It names the client, not one of its directories. Not a secret: it stops a
/// mistake (a second client pointed at the same server folder), not an attacker.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct ClientId(pub u128);

/// 32 lowercase hex digits.
impl fmt::Display for ClientId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:032x}", self.0)
    }
}

impl fmt::Debug for ClientId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ClientId({self})")
    }
}

impl FromStr for ClientId {
    type Err = &'static str;

    /// Exactly 32 hex digits (either case), as [`fmt::Display`] writes them.
    fn from_str(s: &str) -> Result<ClientId, Self::Err> {
        const WANT: &str = "not a client ID (32 hex digits)";
        if s.len() != 32 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(WANT);
        }
        u128::from_str_radix(s, 16).map(ClientId).map_err(|_| WANT)
    }
}

/// A directory as the kernel knows it: device and inode. Two paths name the same directory
/// exactly when these are equal, whatever symlinks or bind mounts lead there.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FileId {
    pub dev: u64,
    pub ino: u64,
}

/// How the server's and the client's directories overlap, when they are on one machine.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Nesting {
    Same,
    /// The server's directory is below the client's: each sync would copy the mirror into
    /// itself, one level deeper.
    ServerInsideClient,
    /// The client's directory is below the server's: the sync would delete it as something
    /// the client lacks.
    ClientInsideServer,
}

impl Nesting {
    /// Compares two chains, each a directory followed by its ancestors up to `/`.
    pub fn of(server_chain: &[FileId], client_chain: &[FileId]) -> Option<Nesting> {
        let (server, client) = (server_chain.first()?, client_chain.first()?);
        if server == client {
            Some(Nesting::Same)
        } else if server_chain[1..].contains(client) {
            Some(Nesting::ServerInsideClient)
        } else if client_chain[1..].contains(server) {
            Some(Nesting::ClientInsideServer)
        } else {
            None
        }
    }
}

/// What the server does with a client, given the client its folder mirrors (if any).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admission {
    /// The client the folder mirrors: go ahead.
    Owner,
    /// The folder mirrors no one yet: go ahead, and remember this client once it is synced.
    First,
    /// Another client's folder, handed over on purpose: go ahead, and remember this client.
    TakeOver { from: ClientId },
    /// Another client's folder: refuse before anything changes.
    Refused { owner: ClientId },
}

impl Admission {
    /// The one place that decides whether `client` may sync into a folder that mirrors
    /// `owner`. (When identities become certificates, this is what changes.)
    pub fn decide(owner: Option<ClientId>, client: ClientId, take_over: bool) -> Admission {
        match owner {
            None => Admission::First,
            Some(o) if o == client => Admission::Owner,
            Some(o) if take_over => Admission::TakeOver { from: o },
            Some(o) => Admission::Refused { owner: o },
        }
    }

    /// Whether the folder's record must name the client once its session has succeeded.
    pub fn records(self) -> bool {
        matches!(self, Admission::First | Admission::TakeOver { .. })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u128) -> ClientId {
        ClientId(n)
    }

    #[test]
    fn client_ids_print_and_parse_as_hex() {
        let c = ClientId(0x0123_4567_89ab_cdef_fedc_ba98_7654_3210);
        let text = c.to_string();
        assert_eq!(text, "0123456789abcdeffedcba9876543210");
        assert_eq!(
            ClientId(1).to_string(),
            format!("{:0>32}", 1),
            "zero-padded"
        );
        assert_eq!(text.parse::<ClientId>(), Ok(c));
        assert_eq!(text.to_uppercase().parse::<ClientId>(), Ok(c));
        let plus = format!("+{}", &text[1..]);
        for bad in [
            "",
            "0123",
            &format!("{text}0"),
            &text.replace('0', "g"),
            &plus,
        ] {
            assert!(bad.parse::<ClientId>().is_err(), "{bad:?} accepted");
        }
        // A multi-byte character must not split a digit pair (and panic).
        let wide = format!("{}é", &text[..30]);
        assert!(wide.parse::<ClientId>().is_err());
    }

    #[test]
    fn nesting_is_found_either_way_and_only_when_there() {
        let f = |ino| FileId { dev: 1, ino };
        // /(1) a(2) b(3) c(4); /(1) x(5)
        let abc = [f(4), f(3), f(2), f(1)];
        let ab = [f(3), f(2), f(1)];
        let x = [f(5), f(1)];
        assert_eq!(Nesting::of(&abc, &abc), Some(Nesting::Same));
        assert_eq!(Nesting::of(&abc, &ab), Some(Nesting::ServerInsideClient));
        assert_eq!(Nesting::of(&ab, &abc), Some(Nesting::ClientInsideServer));
        assert_eq!(Nesting::of(&abc, &x), None, "siblings share only /");
        // Same inode number on another device is another directory.
        let other_dev = [FileId { dev: 2, ino: 4 }, FileId { dev: 2, ino: 1 }];
        assert_eq!(Nesting::of(&abc, &other_dev), None);
        assert_eq!(
            Nesting::of(&[], &abc),
            None,
            "nothing known, nothing refused"
        );
        assert_eq!(Nesting::of(&abc, &[]), None);
    }

    #[test]
    fn a_folder_admits_its_own_client_the_first_and_a_take_over() {
        use Admission::*;
        assert_eq!(Admission::decide(None, id(1), false), First);
        assert_eq!(Admission::decide(None, id(1), true), First);
        assert_eq!(Admission::decide(Some(id(1)), id(1), false), Owner);
        assert_eq!(Admission::decide(Some(id(1)), id(1), true), Owner);
        assert_eq!(
            Admission::decide(Some(id(1)), id(2), false),
            Refused { owner: id(1) }
        );
        assert_eq!(
            Admission::decide(Some(id(1)), id(2), true),
            TakeOver { from: id(1) }
        );
        assert!(First.records() && TakeOver { from: id(1) }.records());
        assert!(!Owner.records() && !Refused { owner: id(1) }.records());
    }
}
