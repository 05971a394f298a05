//! The scheduler lease on a real nats-server: one holder at a time, a standby takes a lease its
//! holder stopped renewing (never sooner than a lease after it last saw it change), the old
//! holder learns it lost it, and a released lease is taken at once.

use motorpool_bus::{Bus, NatsServer, subjects};
use motorpool_scheduler::lease::{self, LeaseSettings, Lost};
use std::time::Duration;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

fn contender(name: &str, lease: Duration) -> LeaseSettings {
    LeaseSettings {
        holder: name.into(),
        instance: format!("{name}-instance"),
        lease,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_scheduler_holds_the_lease_and_one_standby_takes_it_when_it_goes_silent() {
    let server = NatsServer::start().unwrap();
    let bus = Bus::connect(&server.url(), "lease-test", Duration::from_secs(5))
        .await
        .unwrap();
    let kv = bus.ensure_kv(subjects::exec::lease_config()).await.unwrap();
    let period = Duration::from_millis(600);
    let (a, b, c) = (
        contender("a", period),
        contender("b", period),
        contender("c", period),
    );
    let never = CancellationToken::new();

    // A free lease is taken at once, with the first term.
    let mut held_a = lease::acquire(&kv, &a, &never).await.unwrap();
    assert_eq!((held_a.term, held_a.previous.clone()), (1, None));

    // While a renews, neither standby gets it.
    let renewing = CancellationToken::new();
    let holder = tokio::spawn({
        let (kv, a, renewing) = (kv.clone(), a.clone(), renewing.clone());
        async move {
            let lost = lease::hold(&kv, &a, &mut held_a, &renewing).await;
            (lost, held_a)
        }
    });
    let standby = |me: LeaseSettings| {
        let kv = kv.clone();
        tokio::spawn(async move {
            let stop = CancellationToken::new();
            let held = lease::acquire(&kv, &me, &stop).await.unwrap();
            (me.holder.clone(), held, Instant::now())
        })
    };
    let (mut sb, mut sc) = (standby(b.clone()), standby(c.clone()));
    tokio::time::sleep(period * 4).await;
    assert!(
        !sb.is_finished() && !sc.is_finished(),
        "a standby took a lease that was being renewed"
    );

    // a goes silent (as a scheduler killed with -9 does): exactly one standby takes it, with the
    // next term, after the same revision stood for a whole lease.
    renewing.cancel();
    let (lost, held_a) = holder.await.unwrap();
    assert_eq!(lost, Lost::Stopped);
    let silent_since = held_a.renewed();
    let (winner, held, at) = tokio::select! {
        r = &mut sb => r.unwrap(),
        r = &mut sc => r.unwrap(),
        _ = tokio::time::sleep(period * 10) => panic!("no standby took a silent lease"),
    };
    let took = at.duration_since(silent_since);
    assert!(
        took >= period,
        "taken {took:?} after the last renewal, before a lease"
    );
    assert_eq!((held.term, held.previous.as_deref()), (2, Some("a")));
    assert!(held.waited.is_some_and(|w| w >= period));
    // The winner renews; the other standby keeps standing by.
    let me = if winner == "b" { b.clone() } else { c.clone() };
    let stop_winner = CancellationToken::new();
    let winner_holds = tokio::spawn({
        let (kv, me, stop) = (kv.clone(), me.clone(), stop_winner.clone());
        let mut held = held;
        async move {
            let lost = lease::hold(&kv, &me, &mut held, &stop).await;
            (lost, held)
        }
    });
    tokio::time::sleep(period * 3).await;
    let loser = if winner == "b" { &sc } else { &sb };
    assert!(!loser.is_finished(), "both standbys took the lease");

    // a comes back and tries to renew: it learns it lost the lease to the winner.
    let mut stale = held_a;
    let lost = lease::hold(&kv, &a, &mut stale, &never).await;
    assert_eq!(lost, Lost::TakenBy(winner.clone()));

    // The winner stops cleanly and releases: the other standby takes it at once (well under a
    // lease), without waiting out the silence.
    stop_winner.cancel();
    let (lost, held) = winner_holds.await.unwrap();
    assert_eq!(lost, Lost::Stopped);
    let released = Instant::now();
    lease::release(&kv, &held).await;
    let loser = if winner == "b" { sc } else { sb };
    let (next, held, at) = tokio::time::timeout(period * 5, loser)
        .await
        .expect("nobody took a released lease")
        .unwrap();
    assert_ne!(next, winner);
    assert_eq!(held.term, 3);
    assert_eq!(
        held.waited, None,
        "a released lease is taken without waiting"
    );
    let took = at.duration_since(released);
    assert!(took < period, "a released lease took {took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_or_deleted_lease_record_is_taken_over() {
    let server = NatsServer::start().unwrap();
    let bus = Bus::connect(&server.url(), "lease-test", Duration::from_secs(5))
        .await
        .unwrap();
    let kv = bus.ensure_kv(subjects::exec::lease_config()).await.unwrap();
    let me = contender("a", Duration::from_millis(300));
    let never = CancellationToken::new();
    kv.put(subjects::exec::LEASE_KEY, "not a lease".into())
        .await
        .unwrap();
    let held = tokio::time::timeout(Duration::from_secs(5), lease::acquire(&kv, &me, &never))
        .await
        .expect("an unreadable record blocks the lease")
        .unwrap();
    assert_eq!(held.term, 1);
    kv.delete(subjects::exec::LEASE_KEY).await.unwrap();
    let held = tokio::time::timeout(Duration::from_secs(5), lease::acquire(&kv, &me, &never))
        .await
        .expect("a deleted record blocks the lease")
        .unwrap();
    assert_eq!(held.term, 1);
}
