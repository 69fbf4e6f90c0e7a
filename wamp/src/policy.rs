//! The Stack4Things authorization policy (docs/protocols.md, "WAMP authentication and roles").
//!
//! | role | may |
//! |---|---|
//! | `agent` | everything except defining `wamp.*` (the router's own meta API) |
//! | `enrollment` | call `stack4things.register` |
//! | `board` | register `iotronic.<own session>.<own uuid>.*` (but nothing named like an agent procedure); call `stack4things.register` and `<agent>.stack4things.{connection,wamp_alive,notify_result,tunnel_tokens}`; publish under `board.<own uuid>.` |
//! | `legacy` | as `board`, with the uuid the cloud bound to the session after `connection`; until then only the calls |
//!
//! Everything else is refused with `wamp.error.not_authorized`. On top of these URI rules the
//! dealer lets `enrollment`, `board` and `legacy` sessions call only procedures an `agent`
//! session registered: boards never reach each other, whatever the names.

use s4t_shared::wamp::Id;
use s4t_shared::wamp::validate::reserved_uri;

/// The role a session was granted at authentication.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// The cloud's own sessions (the wamp-agent): full access, including the meta API.
    Agent,
    /// A board enrolling with its one-time registration code.
    Enrollment,
    /// An enrolled board (authid = its uuid).
    Board,
    /// An original (Python) lightning-rod joining anonymously, with `--legacy-boards`.
    Legacy,
}

impl Role {
    /// The `authrole` string sent in WELCOME and the meta API.
    pub fn name(self) -> &'static str {
        match self {
            Role::Agent => "agent",
            Role::Enrollment => "enrollment",
            Role::Board => "board",
            Role::Legacy => "legacy",
        }
    }
}

/// What a session asks to do with a URI.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Call,
    Register,
    Publish,
    Subscribe,
}

/// The procedure boards call to enroll.
pub const REGISTER_PROCEDURE: &str = "stack4things.register";
/// The cloud procedures a board calls on its agent: `<agent>.stack4things.<name>`.
pub const AGENT_PROCEDURES: [&str; 4] = ["connection", "wamp_alive", "notify_result", "tunnel_tokens"];

/// Who is asking: the session's role, id and, for boards, its uuid.
#[derive(Debug, Clone, Copy)]
pub struct Subject<'a> {
    pub role: Role,
    pub session: Id,
    /// The board uuid: the authid of a `board` session, or the uuid bound to a `legacy`
    /// session after its `connection` call.
    pub board: Option<&'a str>,
}

/// True when `subject` may perform `action` on `uri`.
pub fn authorize(subject: Subject<'_>, action: Action, uri: &str) -> bool {
    if reserved_uri(uri) && matches!(action, Action::Register | Action::Publish) {
        return false;
    }
    match subject.role {
        Role::Agent => true,
        Role::Enrollment => action == Action::Call && uri == REGISTER_PROCEDURE,
        Role::Board | Role::Legacy => match action {
            Action::Call => uri == REGISTER_PROCEDURE || is_agent_procedure(uri),
            // `iotronic.<s>.<b>.stack4things.connection` is both the board's own and, to
            // `is_agent_procedure`, an agent's: another board could call it.
            Action::Register => {
                subject.board.is_some_and(|b| own_procedure(uri, subject.session, b)) && !is_agent_procedure(uri)
            }
            Action::Publish => subject.board.is_some_and(|b| own_topic(uri, b)),
            Action::Subscribe => false,
        },
    }
}

/// `<agent>.stack4things.<one of AGENT_PROCEDURES>` for any agent name.
fn is_agent_procedure(uri: &str) -> bool {
    let Some((agent, rest)) = uri.split_once(".stack4things.") else { return false };
    !agent.is_empty() && AGENT_PROCEDURES.contains(&rest)
}

/// `iotronic.<session>.<board>.<Method>`.
fn own_procedure(uri: &str, session: Id, board: &str) -> bool {
    let Some(rest) = uri.strip_prefix("iotronic.") else { return false };
    let Some(rest) = rest.strip_prefix(session.to_string().as_str()).and_then(|r| r.strip_prefix('.')) else {
        return false;
    };
    rest.strip_prefix(board).and_then(|r| r.strip_prefix('.')).is_some_and(|method| !method.is_empty())
}

/// `board.<board>.<anything>`.
fn own_topic(uri: &str, board: &str) -> bool {
    uri.strip_prefix("board.")
        .and_then(|r| r.strip_prefix(board))
        .and_then(|r| r.strip_prefix('.'))
        .is_some_and(|rest| !rest.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    const B: &str = "0b8a6f0e-2c3d-4e5f-8a9b-0c1d2e3f4a5b";
    const OTHER: &str = "11111111-2c3d-4e5f-8a9b-0c1d2e3f4a5b";

    fn s(role: Role, board: Option<&str>) -> Subject<'_> {
        Subject { role, session: 42, board }
    }

    #[test]
    fn agent_may_do_everything_but_define_wamp_uris() {
        let a = s(Role::Agent, None);
        assert!(authorize(a, Action::Call, "iotronic.42.x.DevicePing"));
        assert!(authorize(a, Action::Call, "wamp.session.list"));
        assert!(authorize(a, Action::Subscribe, "wamp.session.on_join"));
        assert!(authorize(a, Action::Register, "agent.stack4things.connection"));
        assert!(!authorize(a, Action::Register, "wamp.session.list"));
        assert!(!authorize(a, Action::Publish, "wamp.session.on_join"));
    }

    #[test]
    fn enrollment_may_only_register() {
        let e = s(Role::Enrollment, None);
        assert!(authorize(e, Action::Call, REGISTER_PROCEDURE));
        assert!(!authorize(e, Action::Call, "agent.stack4things.connection"));
        assert!(!authorize(e, Action::Register, "iotronic.42.x.M"));
        assert!(!authorize(e, Action::Subscribe, "board.x.gpio"));
    }

    #[test]
    fn board_is_confined_to_its_own_names() {
        let b = s(Role::Board, Some(B));
        assert!(authorize(b, Action::Register, &format!("iotronic.42.{B}.DevicePing")));
        assert!(!authorize(b, Action::Register, &format!("iotronic.43.{B}.DevicePing")), "another session");
        assert!(!authorize(b, Action::Register, &format!("iotronic.42.{OTHER}.DevicePing")), "another board");
        assert!(!authorize(b, Action::Register, &format!("iotronic.42.{B}")), "no method");
        assert!(!authorize(b, Action::Register, &format!("iotronic.420.{B}.X")), "session prefix only");
        assert!(!authorize(b, Action::Register, "agent.stack4things.connection"));
        for name in AGENT_PROCEDURES {
            let looks_like_an_agent = format!("iotronic.42.{B}.stack4things.{name}");
            assert!(!authorize(b, Action::Register, &looks_like_an_agent), "{looks_like_an_agent}");
        }
        assert!(authorize(b, Action::Register, &format!("iotronic.42.{B}.stack4things.other")));
        assert!(authorize(b, Action::Call, "agent.stack4things.connection"));
        assert!(authorize(b, Action::Call, "my-agent.stack4things.notify_result"));
        assert!(authorize(b, Action::Call, REGISTER_PROCEDURE));
        assert!(!authorize(b, Action::Call, ".stack4things.connection"));
        assert!(!authorize(b, Action::Call, "agent.stack4things.destroy"));
        assert!(!authorize(b, Action::Call, &format!("iotronic.7.{OTHER}.DevicePing")), "boards never call boards");
        assert!(!authorize(b, Action::Call, "wamp.session.list"));
        assert!(authorize(b, Action::Publish, &format!("board.{B}.gpio")));
        assert!(!authorize(b, Action::Publish, &format!("board.{OTHER}.gpio")));
        assert!(!authorize(b, Action::Publish, &format!("board.{B}")));
        assert!(!authorize(b, Action::Subscribe, &format!("board.{B}.gpio")));
        assert!(!authorize(b, Action::Subscribe, "wamp.session.on_join"));
    }

    #[test]
    fn legacy_needs_a_bound_uuid_to_register_or_publish() {
        let unbound = s(Role::Legacy, None);
        assert!(authorize(unbound, Action::Call, "agent.stack4things.connection"));
        assert!(authorize(unbound, Action::Call, REGISTER_PROCEDURE));
        assert!(!authorize(unbound, Action::Register, &format!("iotronic.42.{B}.DevicePing")));
        assert!(!authorize(unbound, Action::Publish, &format!("board.{B}.gpio")));
        let bound = s(Role::Legacy, Some(B));
        assert!(authorize(bound, Action::Register, &format!("iotronic.42.{B}.DevicePing")));
        assert!(!authorize(bound, Action::Register, &format!("iotronic.42.{OTHER}.DevicePing")));
    }
}
