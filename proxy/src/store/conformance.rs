//! The conformance suite every [`Store`] passes: memory, SQLite (a temporary file and
//! `sqlite::memory:`) and Postgres (a database created for the run and dropped after it).
//!
//! Postgres comes from `SLUICE_TEST_DATABASE_URL` (default
//! `postgres://postgres@127.0.0.1:5432/test`); the suite creates `sluice_conf_<uuid>` beside
//! it. When the variable is unset and nothing answers at the default, the Postgres tests say
//! so on stderr and pass; when it is set, failing to connect fails them.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, TimeZone, Utc};
use futures_util::FutureExt;
use serde_json::json;
use sluice_filters::tenancy::{
    Entity, KeyRecord, Kind, SpendQuery, SpendRow, Store, TeamRecord, GLOBAL_ID,
};
use sqlx::{Connection, Row};

use super::open;

const TIMEOUT: Duration = Duration::from_secs(10);

/// Runs every check against a fresh, empty store.
pub(crate) async fn run_all(store: Arc<dyn Store>) {
    starts_empty(&*store).await;
    entity_lifecycle(&*store).await;
    put_with_spend_sets_spend_and_document(&*store).await;
    documents_round_trip(&*store).await;
    change_log(&*store).await;
    write_spend_increments_every_level(&*store).await;
    write_spend_counts_each_request_once(&*store).await;
    spend_log_queries(&*store).await;
    spend_rows_round_trip_exactly(&*store).await;
    concurrent_writers(store.clone()).await;
}

fn at(secs: i64, micros: u32) -> DateTime<Utc> {
    Utc.timestamp_opt(1_750_000_000 + secs, micros * 1_000)
        .unwrap()
}

fn row(request_id: &str, api_key: &str, model_group: &str, spend: f64) -> SpendRow {
    SpendRow {
        request_id: request_id.into(),
        call_type: "acompletion".into(),
        api_key: api_key.into(),
        spend,
        prompt_tokens: 10,
        completion_tokens: 5,
        total_tokens: 15,
        start_time: at(0, 0),
        end_time: at(1, 0),
        completion_start_time: None,
        model: "gpt-4o-2024-08-06".into(),
        model_id: "dep-1".into(),
        model_group: model_group.into(),
        custom_llm_provider: "openai".into(),
        api_base: "https://api.openai.com/v1".into(),
        user: None,
        team_id: None,
        end_user: None,
        status: "success".into(),
        status_code: 200,
        request_tags: vec![],
    }
}

async fn spend_of(store: &dyn Store, kind: Kind, id: &str) -> Option<f64> {
    store.get(kind, id).await.unwrap().map(|e| e.spend)
}

async fn head(store: &dyn Store) -> i64 {
    store.changes_since(0).await.unwrap().0
}

async fn starts_empty(store: &dyn Store) {
    for kind in Kind::ALL {
        assert!(store.list(kind).await.unwrap().is_empty(), "{kind:?}");
    }
    assert_eq!(store.changes_since(0).await.unwrap(), (0, vec![]));
    let all = store.spend_logs(&SpendQuery::default()).await.unwrap();
    assert!(all.is_empty());
}

async fn entity_lifecycle(store: &dyn Store) {
    let d1 = json!({"token": "life-1", "max_budget": 10.0, "models": ["gpt-4o"]});
    let d2 = json!({"token": "life-1", "max_budget": 20.0, "key_alias": "renamed"});

    assert_eq!(store.get(Kind::Key, "life-1").await.unwrap(), None);
    assert!(store.insert(Kind::Key, "life-1", &d1).await.unwrap());
    // A duplicate insert changes nothing.
    assert!(!store.insert(Kind::Key, "life-1", &d2).await.unwrap());
    assert_eq!(
        store.get(Kind::Key, "life-1").await.unwrap(),
        Some(Entity {
            kind: Kind::Key,
            id: "life-1".into(),
            spend: 0.0,
            doc: d1.clone(),
        })
    );
    // The same id under another kind is another entity.
    assert!(store.insert(Kind::User, "life-1", &d2).await.unwrap());
    assert_eq!(
        store.get(Kind::User, "life-1").await.unwrap().unwrap().doc,
        d2
    );
    assert_eq!(
        store.get(Kind::Key, "life-1").await.unwrap().unwrap().doc,
        d1
    );

    // Updating a missing entity neither succeeds nor creates it.
    assert!(!store.update(Kind::Key, "life-missing", &d1).await.unwrap());
    assert_eq!(store.get(Kind::Key, "life-missing").await.unwrap(), None);
    assert!(store.update(Kind::Key, "life-1", &d2).await.unwrap());
    assert_eq!(
        store.get(Kind::Key, "life-1").await.unwrap().unwrap().doc,
        d2
    );

    // Lists hold one kind, ordered by id.
    assert!(store.insert(Kind::Key, "life-2", &json!({})).await.unwrap());
    assert!(store.insert(Kind::Key, "life-0", &json!({})).await.unwrap());
    assert!(store
        .insert(Kind::Team, "life-t", &json!({}))
        .await
        .unwrap());
    let keys = store.list(Kind::Key).await.unwrap();
    let ids: Vec<&str> = keys.iter().map(|e| e.id.as_str()).collect();
    assert_eq!(ids, ["life-0", "life-1", "life-2"]);
    assert!(keys.iter().all(|e| e.kind == Kind::Key));
    assert_eq!(keys[1].doc, d2);
    let users = store.list(Kind::User).await.unwrap();
    assert_eq!(users.len(), 1);
    assert_eq!(
        (users[0].kind, users[0].id.as_str()),
        (Kind::User, "life-1")
    );
    assert!(store.list(Kind::Budget).await.unwrap().is_empty());

    // Deletes are reported once and leave other kinds alone.
    assert!(store.delete(Kind::Key, "life-1").await.unwrap());
    assert!(!store.delete(Kind::Key, "life-1").await.unwrap());
    assert_eq!(store.get(Kind::Key, "life-1").await.unwrap(), None);
    assert!(store.get(Kind::User, "life-1").await.unwrap().is_some());
    assert_eq!(store.list(Kind::Key).await.unwrap().len(), 2);
    // A deleted id can be created again, with no spend carried over.
    assert!(store.insert(Kind::Key, "life-1", &d1).await.unwrap());
    assert_eq!(spend_of(store, Kind::Key, "life-1").await, Some(0.0));
    // Records read back through the typed view.
    let key: KeyRecord = store
        .get(Kind::Key, "life-1")
        .await
        .unwrap()
        .unwrap()
        .record()
        .unwrap();
    assert_eq!(key.limits.max_budget, Some(10.0));
    assert_eq!(key.models, ["gpt-4o"]);
}

async fn put_with_spend_sets_spend_and_document(store: &dyn Store) {
    let doc = |v: u32| json!({"team_id": "pws-1", "team_alias": format!("v{v}")});
    // Creates when missing.
    store
        .put_with_spend(Kind::Team, "pws-1", 2.5, &doc(1))
        .await
        .unwrap();
    let e = store.get(Kind::Team, "pws-1").await.unwrap().unwrap();
    assert_eq!((e.spend, &e.doc), (2.5, &doc(1)));
    // An update keeps the spend column.
    assert!(store.update(Kind::Team, "pws-1", &doc(2)).await.unwrap());
    let e = store.get(Kind::Team, "pws-1").await.unwrap().unwrap();
    assert_eq!((e.spend, &e.doc), (2.5, &doc(2)));
    // A reset sets both.
    store
        .put_with_spend(Kind::Team, "pws-1", 0.0, &doc(3))
        .await
        .unwrap();
    let e = store.get(Kind::Team, "pws-1").await.unwrap().unwrap();
    assert_eq!((e.spend, &e.doc), (0.0, &doc(3)));
    assert!(!store.insert(Kind::Team, "pws-1", &doc(4)).await.unwrap());
    store
        .put_with_spend(Kind::Team, "pws-1", 7.75, &doc(5))
        .await
        .unwrap();
    let team: TeamRecord = store
        .get(Kind::Team, "pws-1")
        .await
        .unwrap()
        .unwrap()
        .record()
        .unwrap();
    assert_eq!(team.spend, 7.75);
    assert_eq!(team.team_alias.as_deref(), Some("v5"));
}

async fn documents_round_trip(store: &dyn Store) {
    let mut deep = json!("bottom");
    for i in 0..40 {
        deep = json!({ format!("level{i}"): [deep] });
    }
    let docs = [
        json!({
            "unicode": "héllo ✓ 日本語 🚀 Ω",
            "escapes": "quote \" backslash \\ newline \n tab \t nul \u{0} bell \u{7}",
            "sql": "'; DROP TABLE sluice_entities; --",
            "numbers": [0, -1, 1.5, 0.1, 1e-7, 3.5e300, i64::MIN, u64::MAX],
            "literals": [true, false, null],
            "nested": {"a": {"b": {"c": []}}, "empty": {}},
            "🔑 key with spaces": "value",
            "long": "x".repeat(100_000),
        }),
        json!([1, "two", null, {"three": 3}]),
        json!("a bare string"),
        json!(42),
        json!(null),
        json!({}),
        deep,
    ];
    let ids = [
        "doc-plain",
        "doc-ключ/🚀 'single' \"double\" %_ wildcard",
        "doc-",
        "doc- spaces ",
        "doc-\\back",
        "doc-ünï",
        "doc-deep",
    ];
    for (id, doc) in ids.iter().zip(&docs) {
        assert!(store.insert(Kind::Customer, id, doc).await.unwrap(), "{id}");
    }
    for (id, doc) in ids.iter().zip(&docs) {
        let got = store.get(Kind::Customer, id).await.unwrap().unwrap();
        assert_eq!(&got.doc, doc, "{id}");
        assert_eq!(got.id, *id);
    }
    let listed = store.list(Kind::Customer).await.unwrap();
    for (id, doc) in ids.iter().zip(&docs) {
        let e = listed.iter().find(|e| e.id == *id).expect(id);
        assert_eq!(&e.doc, doc, "{id}");
    }
    // Byte order, the same on every backend.
    let listed_ids: Vec<&str> = listed.iter().map(|e| e.id.as_str()).collect();
    let mut sorted = listed_ids.clone();
    sorted.sort_unstable();
    assert_eq!(listed_ids, sorted);
    // Updates round-trip too; ids are exact, not patterns.
    assert!(store
        .update(Kind::Customer, ids[1], &docs[0])
        .await
        .unwrap());
    assert_eq!(
        store
            .get(Kind::Customer, ids[1])
            .await
            .unwrap()
            .unwrap()
            .doc,
        docs[0]
    );
    assert_eq!(store.get(Kind::Customer, "doc-%").await.unwrap(), None);
    for id in ids {
        assert!(store.delete(Kind::Customer, id).await.unwrap(), "{id}");
    }
}

async fn change_log(store: &dyn Store) {
    let h0 = head(store).await;
    assert!(h0 > 0, "earlier writes were logged");
    assert_eq!(store.changes_since(h0).await.unwrap(), (h0, vec![]));
    assert_eq!(
        store.changes_since(i64::MAX).await.unwrap(),
        (i64::MAX, vec![])
    );

    assert!(store.insert(Kind::Key, "chg-a", &json!({})).await.unwrap());
    let (h1, changes) = store.changes_since(h0).await.unwrap();
    assert!(h1 > h0);
    assert_eq!(changes, [(Kind::Key, "chg-a".to_string())]);

    // Writes that change nothing are not logged.
    assert!(!store.insert(Kind::Key, "chg-a", &json!({})).await.unwrap());
    assert!(!store
        .update(Kind::Key, "chg-missing", &json!({}))
        .await
        .unwrap());
    assert!(!store.delete(Kind::Key, "chg-missing").await.unwrap());
    assert_eq!(store.changes_since(h1).await.unwrap(), (h1, vec![]));

    assert!(store
        .update(Kind::Key, "chg-a", &json!({"v": 2}))
        .await
        .unwrap());
    let (h2, changes) = store.changes_since(h1).await.unwrap();
    assert!(h2 > h1);
    assert_eq!(changes, [(Kind::Key, "chg-a".to_string())]);

    store
        .put_with_spend(Kind::Budget, "chg-b", 1.0, &json!({"budget_id": "chg-b"}))
        .await
        .unwrap();
    let (h3, changes) = store.changes_since(h2).await.unwrap();
    assert!(h3 > h2);
    assert_eq!(changes, [(Kind::Budget, "chg-b".to_string())]);

    assert!(store.delete(Kind::Key, "chg-a").await.unwrap());
    let (h4, changes) = store.changes_since(h3).await.unwrap();
    assert!(h4 > h3);
    assert_eq!(changes, [(Kind::Key, "chg-a".to_string())]);

    // From an older cursor: each entity once, in order of its first change.
    let (h, changes) = store.changes_since(h0).await.unwrap();
    assert_eq!(h, h4);
    assert_eq!(
        changes,
        [
            (Kind::Key, "chg-a".to_string()),
            (Kind::Budget, "chg-b".to_string())
        ]
    );
    // Spend written by `write_spend` is not a change.
    store
        .write_spend(&[row("chg-spend", "chg-key", "chg-group", 0.5)])
        .await
        .unwrap();
    assert_eq!(store.changes_since(h4).await.unwrap(), (h4, vec![]));
}

async fn write_spend_increments_every_level(store: &dyn Store) {
    let global_before = spend_of(store, Kind::Global, GLOBAL_ID)
        .await
        .unwrap_or(0.0);
    let key_doc = json!({"token": "inc-key", "max_budget": 100.0});
    assert!(store.insert(Kind::Key, "inc-key", &key_doc).await.unwrap());
    for (kind, id) in [
        (Kind::User, "inc-user"),
        (Kind::Team, "inc-team"),
        (Kind::Customer, "inc-cust"),
    ] {
        assert!(store.insert(kind, id, &json!({"n": id})).await.unwrap());
    }
    let h = head(store).await;

    let mut a = row("inc-a", "inc-key", "inc-g1", 0.25);
    a.user = Some("inc-user".into());
    a.team_id = Some("inc-team".into());
    a.end_user = Some("inc-cust".into());
    let mut b = row("inc-b", "inc-key", "inc-g2", 0.5);
    b.end_user = Some(String::new()); // empty: no customer counter
    let mut c = row("inc-c", "inc-ghost", "inc-g1", 1.0);
    c.user = Some("inc-ghost-user".into());
    let mut d = row("inc-d", "inc-key", "inc-g1", 0.0);
    d.status = "failure".into();
    d.status_code = 500;
    let e = row("inc-e", "", "inc-g3", 2.0); // auth off: no key counters
    store.write_spend(&[a, b, c, d, e]).await.unwrap();

    let expect = [
        (Kind::Global, GLOBAL_ID, Some(global_before + 3.75)),
        (Kind::Model, "inc-g1", Some(1.25)),
        (Kind::Model, "inc-g2", Some(0.5)),
        (Kind::Model, "inc-g3", Some(2.0)),
        (Kind::KeyModel, "inc-key/inc-g1", Some(0.25)),
        (Kind::KeyModel, "inc-key/inc-g2", Some(0.5)),
        // Per-key model counters exist as spend only, so they are created even for a key the
        // store does not know.
        (Kind::KeyModel, "inc-ghost/inc-g1", Some(1.0)),
        (Kind::KeyModel, "/inc-g3", None),
        (Kind::Key, "inc-key", Some(0.75)),
        (Kind::User, "inc-user", Some(0.25)),
        (Kind::Team, "inc-team", Some(0.25)),
        (Kind::Customer, "inc-cust", Some(0.25)),
        // Keys, users, teams and customers are never created by spend.
        (Kind::Key, "inc-ghost", None),
        (Kind::Key, "", None),
        (Kind::User, "inc-ghost-user", None),
        (Kind::Customer, "", None),
    ];
    for (kind, id, spend) in expect {
        assert_eq!(spend_of(store, kind, id).await, spend, "{kind:?} {id}");
    }
    // Counters created by spend have an empty document; existing documents are untouched.
    let g1 = store.get(Kind::Model, "inc-g1").await.unwrap().unwrap();
    assert_eq!(g1.doc, json!({}));
    let global = store.get(Kind::Global, GLOBAL_ID).await.unwrap().unwrap();
    assert_eq!(global.doc, json!({}));
    let key = store.get(Kind::Key, "inc-key").await.unwrap().unwrap();
    assert_eq!(key.doc, key_doc);
    // Spend increments are not changes; the spend column survives a document update.
    assert_eq!(store.changes_since(h).await.unwrap(), (h, vec![]));
    let key_doc2 = json!({"token": "inc-key", "max_budget": 200.0});
    assert!(store.update(Kind::Key, "inc-key", &key_doc2).await.unwrap());
    assert_eq!(spend_of(store, Kind::Key, "inc-key").await, Some(0.75));
    // More spend adds to what is there.
    store
        .write_spend(&[row("inc-f", "inc-key", "inc-g1", 0.125)])
        .await
        .unwrap();
    assert_eq!(spend_of(store, Kind::Key, "inc-key").await, Some(0.875));
    assert_eq!(spend_of(store, Kind::Model, "inc-g1").await, Some(1.375));
    assert_eq!(
        spend_of(store, Kind::KeyModel, "inc-key/inc-g1").await,
        Some(0.375)
    );
    assert_eq!(
        spend_of(store, Kind::Global, GLOBAL_ID).await,
        Some(global_before + 3.875)
    );
    // Spend on a deleted key is dropped, not resurrected.
    assert!(store.delete(Kind::Key, "inc-key").await.unwrap());
    store
        .write_spend(&[row("inc-g", "inc-key", "inc-g1", 0.5)])
        .await
        .unwrap();
    assert_eq!(spend_of(store, Kind::Key, "inc-key").await, None);
    assert_eq!(
        spend_of(store, Kind::KeyModel, "inc-key/inc-g1").await,
        Some(0.875)
    );
}

async fn write_spend_counts_each_request_once(store: &dyn Store) {
    assert!(store
        .insert(Kind::Key, "idem-key", &json!({}))
        .await
        .unwrap());
    let by_key = SpendQuery {
        api_key: Some("idem-key".into()),
        ..Default::default()
    };
    store.write_spend(&[]).await.unwrap();

    let batch = [
        row("idem-1", "idem-key", "idem-g", 0.125),
        row("idem-2", "idem-key", "idem-g", 0.25),
    ];
    store.write_spend(&batch).await.unwrap();
    // A batch whose commit was not acknowledged is written again: counted once.
    store.write_spend(&batch).await.unwrap();
    assert_eq!(spend_of(store, Kind::Key, "idem-key").await, Some(0.375));
    assert_eq!(spend_of(store, Kind::Model, "idem-g").await, Some(0.375));
    assert_eq!(store.spend_logs(&by_key).await.unwrap().len(), 2);

    // A batch mixing stored and new rows counts the new ones; of two rows with one id in a
    // batch, the first is kept.
    let mut dup = row("idem-3", "idem-key", "idem-g", 4.0);
    dup.model = "second".into();
    store
        .write_spend(&[
            batch[1].clone(),
            row("idem-3", "idem-key", "idem-g", 0.5),
            dup,
        ])
        .await
        .unwrap();
    assert_eq!(spend_of(store, Kind::Key, "idem-key").await, Some(0.875));
    assert_eq!(
        spend_of(store, Kind::KeyModel, "idem-key/idem-g").await,
        Some(0.875)
    );
    let logs = store.spend_logs(&by_key).await.unwrap();
    assert_eq!(logs.len(), 3);
    let third = logs.iter().find(|r| r.request_id == "idem-3").unwrap();
    assert_eq!((third.spend, &*third.model), (0.5, "gpt-4o-2024-08-06"));

    // A large batch (several insert statements or COPY messages) with a stored id far in:
    // the new rows all go in, the stored one counts once.
    let big: Vec<SpendRow> = (0..2500)
        .map(|i| {
            if i == 2100 {
                batch[0].clone()
            } else {
                row(&format!("idem-big-{i}"), "idem-key", "idem-g", 0.5)
            }
        })
        .collect();
    store.write_spend(&big).await.unwrap();
    assert_eq!(
        spend_of(store, Kind::Key, "idem-key").await,
        Some(0.875 + 2499.0 * 0.5)
    );
    assert_eq!(store.spend_logs(&by_key).await.unwrap().len(), 3 + 2499);
}

/// Every field of a spend row reads back exactly as written: text that array literals, SQL or
/// JSON would treat specially, and floats whose shortest decimal form is long or extreme.
async fn spend_rows_round_trip_exactly(store: &dyn Store) {
    let awkward = [
        "",
        "NULL",
        " padded ",
        "quote \" and backslash \\ and both \\\"",
        "{braces, commas}",
        "tab\tnewline\nü 🚀",
        "'single' $1 ? %s",
        "\\N, \\t and a carriage\r\nreturn",
    ];
    let spends = [
        0.1 + 0.2,
        1.0 / 3.0,
        5e-324,
        f64::MAX,
        123_456.789e-10,
        0.0,
        -0.5,
        -f64::MIN_POSITIVE,
    ];
    let rows: Vec<SpendRow> = awkward
        .iter()
        .zip(spends)
        .enumerate()
        .map(|(i, (text, spend))| {
            let mut r = row(&format!("exact-{i}"), "exact-key", "exact-g", spend);
            r.model = (*text).into();
            r.api_base = format!("{text}/v1").into();
            r.user = (i % 2 == 0).then(|| (*text).into());
            r.team_id = (i % 3 == 0).then(|| format!("team {text}"));
            r.end_user = (i % 2 == 1).then(|| (*text).into());
            r.request_tags = vec![(*text).into(), "t".into()];
            r.completion_start_time = (i % 2 == 0).then(|| at(i as i64, 654_321));
            r.prompt_tokens = u64::from(u32::MAX) * (i as u64 + 1);
            r.status_code = 400 + i as u16;
            r
        })
        .collect();
    store.write_spend(&rows).await.unwrap();
    for r in &rows {
        let query = SpendQuery {
            request_id: Some(r.request_id.clone()),
            ..Default::default()
        };
        let got = store.spend_logs(&query).await.unwrap();
        assert_eq!(got.len(), 1, "{}", r.request_id);
        assert_eq!(&got[0], r);
        assert_eq!(
            got[0].spend.to_bits(),
            r.spend.to_bits(),
            "{}",
            r.request_id
        );
    }
}

async fn spend_log_queries(store: &dyn Store) {
    let mut q1 = row("q1", "qk1", "qg", 0.5);
    q1.user = Some("qu1".into());
    q1.team_id = Some("qt1".into());
    q1.end_user = Some("qc1".into());
    q1.start_time = at(100, 0);
    q1.end_time = at(101, 250_001);
    q1.completion_start_time = Some(at(100, 999_999));
    q1.request_tags = vec!["prod".into(), "ü 🚀".into(), "".into()];
    q1.status = "failure".into();
    q1.status_code = 429;
    q1.prompt_tokens = u64::from(u32::MAX) + 7;
    q1.api_base = "https://example.test/v1?x='y'".into();
    let mut q2 = row("q2", "qk1", "qg", 0.25);
    q2.user = Some("qu2".into());
    q2.team_id = Some("qt1".into());
    q2.start_time = at(200, 0);
    let mut q3 = row("q3", "qk2", "qg", 0.25);
    q3.user = Some("qu1".into());
    q3.end_user = Some("qc1".into());
    q3.start_time = at(300, 0);
    let mut q4 = row("q4", "qk2", "qg", 0.0);
    q4.start_time = at(300, 0); // same time as q3: ordered by request id, descending
    let mut q5 = row("q5", "qk1", "qg", 0.125);
    q5.start_time = at(50, 123_456);
    let all = [q1.clone(), q2.clone(), q3.clone(), q4.clone(), q5.clone()];
    store.write_spend(&all).await.unwrap();

    let ids = |rows: Vec<SpendRow>| -> Vec<String> {
        rows.into_iter().map(|r| r.request_id).collect::<Vec<_>>()
    };
    let query = |f: &dyn Fn(&mut SpendQuery)| {
        let mut q = SpendQuery::default();
        f(&mut q);
        q
    };
    let cases: Vec<(SpendQuery, Vec<&str>)> = vec![
        (
            query(&|q| q.api_key = Some("qk1".into())),
            vec!["q2", "q1", "q5"],
        ),
        (
            query(&|q| {
                q.api_key = Some("qk1".into());
                q.limit = Some(2);
            }),
            vec!["q2", "q1"],
        ),
        (
            query(&|q| {
                q.api_key = Some("qk1".into());
                q.limit = Some(0);
            }),
            vec![],
        ),
        (query(&|q| q.api_key = Some("qk2".into())), vec!["q4", "q3"]),
        (query(&|q| q.user = Some("qu1".into())), vec!["q3", "q1"]),
        (query(&|q| q.team_id = Some("qt1".into())), vec!["q2", "q1"]),
        (
            query(&|q| q.end_user = Some("qc1".into())),
            vec!["q3", "q1"],
        ),
        (query(&|q| q.request_id = Some("q3".into())), vec!["q3"]),
        (query(&|q| q.request_id = Some("q%".into())), vec![]),
        (
            query(&|q| {
                q.api_key = Some("qk1".into());
                q.user = Some("qu2".into());
            }),
            vec!["q2"],
        ),
        // Start and end are both inclusive, to the microsecond.
        (
            query(&|q| {
                q.api_key = Some("qk1".into());
                q.start = Some(at(100, 0));
                q.end = Some(at(200, 0));
            }),
            vec!["q2", "q1"],
        ),
        (
            query(&|q| {
                q.api_key = Some("qk1".into());
                q.start = Some(at(100, 1));
            }),
            vec!["q2"],
        ),
        (
            query(&|q| {
                q.api_key = Some("qk1".into());
                q.end = Some(at(50, 123_456));
            }),
            vec!["q5"],
        ),
        (
            query(&|q| {
                q.api_key = Some("qk1".into());
                q.end = Some(at(50, 123_455));
            }),
            vec![],
        ),
        (
            query(&|q| {
                q.start = Some(at(250, 0));
                q.end = Some(at(300, 0));
            }),
            vec!["q4", "q3"],
        ),
    ];
    for (q, want) in cases {
        assert_eq!(ids(store.spend_logs(&q).await.unwrap()), want, "{q:?}");
    }

    // Rows come back exactly as written.
    for r in &all {
        let got = store
            .spend_logs(&SpendQuery {
                request_id: Some(r.request_id.clone()),
                ..Default::default()
            })
            .await
            .unwrap();
        assert_eq!(got, std::slice::from_ref(r));
    }
    // Everything, newest first.
    let everything = store.spend_logs(&SpendQuery::default()).await.unwrap();
    assert!(everything.len() > all.len());
    assert!(everything
        .windows(2)
        .all(|w| (w[0].start_time, &w[0].request_id) >= (w[1].start_time, &w[1].request_id)));
    // Times are kept to the microsecond.
    let mut fine = row("q6", "qk3", "qg", 0.0);
    fine.start_time = Utc.timestamp_opt(1_750_000_000, 123_456_789).unwrap();
    store.write_spend(&[fine]).await.unwrap();
    let got = store
        .spend_logs(&SpendQuery {
            api_key: Some("qk3".into()),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(got[0].start_time, at(0, 123_456));
}

async fn concurrent_writers(store: Arc<dyn Store>) {
    assert!(store
        .insert(Kind::Key, "conc-key", &json!({}))
        .await
        .unwrap());
    let mut tasks = Vec::new();
    for t in 0..8 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            for b in 0..5 {
                let rows: Vec<SpendRow> = (0..20)
                    .map(|i| row(&format!("conc-{t}-{b}-{i}"), "conc-key", "conc-g", 0.125))
                    .collect();
                store.write_spend(&rows).await.unwrap();
            }
            let won = store
                .insert(Kind::Team, "conc-race", &json!({"by": t}))
                .await
                .unwrap();
            store
                .update(Kind::Team, "conc-race", &json!({"last": t}))
                .await
                .unwrap();
            won
        }));
    }
    let mut winners = 0;
    for task in tasks {
        winners += usize::from(task.await.unwrap());
    }
    assert_eq!(winners, 1, "exactly one concurrent insert wins");
    assert_eq!(spend_of(&*store, Kind::Key, "conc-key").await, Some(100.0));
    assert_eq!(spend_of(&*store, Kind::Model, "conc-g").await, Some(100.0));
    let logs = store
        .spend_logs(&SpendQuery {
            api_key: Some("conc-key".into()),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(logs.len(), 800);
}

/// Writes 1000 rows in one batch (20 keys, 5 model groups, 50 users, 10 teams, 100 end users:
/// 206 counters) and prints how long it took; then the same batch again (every row skipped),
/// then another 1000 new rows on the same counters (prepared statements now cached).
pub(crate) async fn bench_write_1000(store: Arc<dyn Store>, label: &str) {
    for k in 0..20 {
        store
            .insert(Kind::Key, &format!("bench-key-{k}"), &json!({}))
            .await
            .unwrap();
    }
    let batch = |round: i64| -> Vec<SpendRow> {
        (0..1000)
            .map(|i| {
                let mut r = row(
                    &format!("bench-{round}-{i}"),
                    &format!("bench-key-{}", i % 20),
                    &format!("bench-g{}", i % 5),
                    0.001,
                );
                r.user = Some(format!("bench-user-{}", i % 50));
                r.team_id = Some(format!("bench-team-{}", i % 10));
                r.end_user = Some(format!("bench-cust-{}", i % 100));
                r.request_tags = vec!["bench".into()];
                r.start_time = at(round * 1000 + i, 0);
                r
            })
            .collect()
    };
    let (first, second) = (batch(0), batch(1));
    let mut took = Vec::new();
    for rows in [&first, &first, &second] {
        let t = Instant::now();
        store.write_spend(rows).await.unwrap();
        took.push(t.elapsed());
    }
    eprintln!(
        "{label}: write_spend of 1000 new rows took {:?}; the same 1000 again {:?}; \
         1000 more new rows {:?}",
        took[0], took[1], took[2]
    );
    let logs = store
        .spend_logs(&SpendQuery {
            api_key: Some("bench-key-0".into()),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(logs.len(), 100);
    let spend = spend_of(&*store, Kind::Key, "bench-key-0").await.unwrap();
    assert!((spend - 0.1).abs() < 1e-9, "{spend}");
}

// ---------------------------------------------------------------------------------------------
// The backends.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_store_conforms() {
    let store: Arc<dyn Store> = Arc::new(super::MemoryStore::new());
    run_all(store.clone()).await;
    bench_write_1000(store, "memory").await;
}

/// A SQLite file under the temp dir, removed with its WAL files when dropped.
struct TempSqlite(std::path::PathBuf);

impl TempSqlite {
    fn new() -> TempSqlite {
        let name = format!("sluice-conf-{}.db", uuid::Uuid::new_v4().simple());
        TempSqlite(std::env::temp_dir().join(name))
    }

    fn url(&self) -> String {
        format!("sqlite://{}", self.0.display())
    }
}

impl Drop for TempSqlite {
    fn drop(&mut self) {
        for suffix in ["", "-wal", "-shm"] {
            let mut path = self.0.clone().into_os_string();
            path.push(suffix);
            let _ = std::fs::remove_file(path);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_file_store_conforms() {
    let file = TempSqlite::new();
    let store = open(Some(&file.url()), 4, TIMEOUT).await.unwrap();
    run_all(store.clone()).await;
    bench_write_1000(store.clone(), "sqlite file").await;
    drop(store);

    // Reopening finds the data and applies no migration twice.
    let store = open(Some(&file.url()), 4, TIMEOUT).await.unwrap();
    assert_eq!(spend_of(&*store, Kind::Key, "conc-key").await, Some(100.0));
    let mut conn = sqlx::AnyConnection::connect(&file.url()).await.unwrap();
    let mode: String = sqlx::query("PRAGMA journal_mode")
        .fetch_one(&mut conn)
        .await
        .unwrap()
        .get(0);
    assert_eq!(mode, "wal");
    let page_size: i64 = sqlx::query("PRAGMA page_size")
        .fetch_one(&mut conn)
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        page_size, 32768,
        "a new file gets the spend log's page size"
    );
    assert_migrated_once(&mut conn, "sqlite").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_memory_store_conforms() {
    let store = open(Some("sqlite::memory:"), 4, TIMEOUT).await.unwrap();
    run_all(store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_opened_twice_at_once_migrates_once() {
    let file = TempSqlite::new();
    let url = file.url();
    let (a, b) = tokio::join!(open(Some(&url), 2, TIMEOUT), open(Some(&url), 2, TIMEOUT));
    let (a, b) = (a.unwrap(), b.unwrap());
    assert!(a.insert(Kind::Key, "k", &json!({})).await.unwrap());
    assert!(b.get(Kind::Key, "k").await.unwrap().is_some());
    let mut conn = sqlx::AnyConnection::connect(&url).await.unwrap();
    assert_migrated_once(&mut conn, "sqlite").await;
}

async fn assert_migrated_once(conn: &mut sqlx::AnyConnection, backend: &str) {
    let versions: Vec<i64> = sqlx::query("SELECT version FROM sluice_migrations ORDER BY version")
        .fetch_all(conn)
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let embedded: Vec<i64> = super::sql::embedded_migrations()[backend]
        .iter()
        .map(|(v, _)| *v)
        .collect();
    assert_eq!(versions, embedded);
}

/// A Postgres database made for one test and dropped after it.
struct PgTestDb {
    admin_url: String,
    name: String,
    url: String,
}

impl PgTestDb {
    async fn create() -> Option<PgTestDb> {
        sqlx::any::install_default_drivers();
        let explicit = std::env::var("SLUICE_TEST_DATABASE_URL").ok();
        let admin_url = explicit
            .clone()
            .unwrap_or_else(|| "postgres://postgres@127.0.0.1:5432/test".into());
        let mut conn = match sqlx::AnyConnection::connect(&admin_url).await {
            Ok(conn) => conn,
            Err(e) if explicit.is_none() => {
                eprintln!(
                    "SKIPPED: no Postgres at {admin_url} ({e}); set SLUICE_TEST_DATABASE_URL \
                     to run the Postgres conformance tests"
                );
                return None;
            }
            Err(e) => panic!("cannot connect to SLUICE_TEST_DATABASE_URL: {e}"),
        };
        let name = format!("sluice_conf_{}", uuid::Uuid::new_v4().simple());
        sqlx::raw_sql(&format!("CREATE DATABASE {name}"))
            .execute(&mut conn)
            .await
            .unwrap();
        let _ = conn.close().await;
        let url = with_database(&admin_url, &name);
        Some(PgTestDb {
            admin_url,
            name,
            url,
        })
    }

    /// Runs `test`, then drops the database whether or not it passed.
    async fn run<F: std::future::Future<Output = ()>>(self, test: F) {
        let result = AssertUnwindSafe(test).catch_unwind().await;
        let mut conn = sqlx::AnyConnection::connect(&self.admin_url).await.unwrap();
        sqlx::raw_sql(&format!(
            "DROP DATABASE IF EXISTS {} WITH (FORCE)",
            self.name
        ))
        .execute(&mut conn)
        .await
        .unwrap();
        if let Err(panic) = result {
            std::panic::resume_unwind(panic);
        }
    }
}

/// `url` with its database (the path) replaced by `db`.
fn with_database(url: &str, db: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let authority = base.find("://").map_or(0, |i| i + 3);
    let path = base[authority..]
        .find('/')
        .map_or(base.len(), |i| authority + i);
    let mut out = format!("{}/{db}", &base[..path]);
    if let Some(q) = query {
        out.push('?');
        out.push_str(q);
    }
    out
}

#[test]
fn with_database_replaces_the_path_only() {
    assert_eq!(
        with_database("postgres://u:p@h:5432/test?sslmode=disable", "x"),
        "postgres://u:p@h:5432/x?sslmode=disable"
    );
    assert_eq!(with_database("postgres://h", "x"), "postgres://h/x");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_store_conforms() {
    let Some(db) = PgTestDb::create().await else {
        return;
    };
    let url = db.url.clone();
    db.run(async move {
        let store = open(Some(&url), 8, TIMEOUT).await.unwrap();
        run_all(store.clone()).await;
        bench_write_1000(store.clone(), "postgres").await;
        // Reopening applies no migration twice.
        drop(store);
        let store = open(Some(&url), 2, TIMEOUT).await.unwrap();
        assert_eq!(spend_of(&*store, Kind::Key, "conc-key").await, Some(100.0));
        let mut conn = sqlx::AnyConnection::connect(&url).await.unwrap();
        assert_migrated_once(&mut conn, "postgres").await;
        let _ = conn.close().await;
    })
    .await;
}

/// Two instances starting together against a new database: the migration lock lets one
/// migrate while the other waits, then finds nothing to do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_opened_twice_at_once_migrates_once() {
    let Some(db) = PgTestDb::create().await else {
        return;
    };
    let url = db.url.clone();
    db.run(async move {
        let (a, b) = tokio::join!(
            tokio::spawn({
                let url = url.clone();
                async move { open(Some(&url), 2, TIMEOUT).await }
            }),
            tokio::spawn({
                let url = url.clone();
                async move { open(Some(&url), 2, TIMEOUT).await }
            }),
        );
        let (a, b) = (a.unwrap().unwrap(), b.unwrap().unwrap());
        assert!(a.insert(Kind::Key, "k", &json!({})).await.unwrap());
        assert!(b.get(Kind::Key, "k").await.unwrap().is_some());
        let (_, changes) = b.changes_since(0).await.unwrap();
        assert_eq!(changes, [(Kind::Key, "k".to_string())]);
        let mut conn = sqlx::AnyConnection::connect(&url).await.unwrap();
        assert_migrated_once(&mut conn, "postgres").await;
        let _ = conn.close().await;
    })
    .await;
}
