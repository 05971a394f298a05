//! The fleet's page on `motorpool up`: what the burners and image builders report on the bus
//! (drive states with their progress and the images each drive holds, image builds) is shown
//! per burner, escaped, with its JSON twin, in a real browser with JavaScript off.

mod support;

use motorpool_bus::subjects::fleet;
use motorpool_messages::fleet::{BuildState, BuildStatus, DriveImage, DriveKind, DriveStatus};
use serde_json::Value;
use support::Stack;
use support::browser::Browser;
use support::ci::http;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_drive_bays_page_shows_every_burners_drives_and_the_image_builds() {
    let stack = Stack::up(&["--workers", "0"]);
    let _log = support::LogOnPanic(&stack);
    // What burners and a builder wrote, as their bus users would.
    let admin = stack.bus_as("admin").await;
    let drives = admin.ensure_kv(fleet::drives_config()).await.unwrap();
    let now = motorpool_messages::now_ms();
    let drive =
        |burner: &str, bay: &str, kind, image: &str, done, total, reason: &str| DriveStatus {
            burner: burner.into(),
            drive: format!("/dev/disk/by-path/{bay}"),
            kind,
            image: image.into(),
            slot: 2,
            done,
            total,
            reason: reason.into(),
            updated_ms: now,
            images: match kind {
                DriveKind::Refused => Vec::new(),
                _ => vec![
                    DriveImage {
                        slot: 1,
                        image: "car-v1.9".into(),
                        default: false,
                    },
                    DriveImage {
                        slot: 2,
                        image: image.into(),
                        default: kind == DriveKind::Ready,
                    },
                ],
            },
        };
    for d in [
        drive(
            "flexo-1",
            "bay0",
            DriveKind::Burning,
            "car-v2.1",
            3 << 30,
            8 << 30,
            "",
        ),
        drive("flexo-1", "bay1", DriveKind::Ready, "car-v2.0", 0, 0, ""),
        drive(
            "flexo-2",
            "bay0",
            DriveKind::Refused,
            "",
            0,
            0,
            "not ours: <script>alert(1)</script>",
        ),
    ] {
        let key = format!("{}.{}", d.burner, d.drive.rsplit('/').next().unwrap());
        drives
            .put(key, motorpool_messages::codec::encode(&d).unwrap().into())
            .await
            .unwrap();
    }
    let builds = admin.ensure_kv(fleet::builds_config()).await.unwrap();
    let build = BuildStatus {
        job_id: "b".repeat(32),
        state: BuildState::Running {
            step: "docker build".into(),
        },
        updated_ms: now,
    };
    builds
        .put(
            &build.job_id,
            motorpool_messages::codec::encode(&build).unwrap().into(),
        )
        .await
        .unwrap();

    let (http_addr, key) = (stack.http, stack.keys.developer.clone());
    let (json, page) = tokio::task::spawn_blocking(move || {
        let auth = format!("Bearer {key}");
        let get = |p: &str| {
            http(
                http_addr,
                "GET",
                p,
                &[("Authorization", auth.as_str())],
                b"",
            )
        };
        let (status, body) = get("/api/v1/drives");
        assert_eq!(status, 200, "{body}");
        let (status, page) = get("/fleet");
        assert_eq!(status, 200, "{page}");
        let (status, _) = http(http_addr, "GET", "/api/v1/drives", &[], b"");
        assert_eq!(status, 401, "no key, no drives");
        (serde_json::from_str::<Value>(&body).unwrap(), page)
    })
    .await
    .unwrap();
    let states: Vec<(&str, &str)> = json
        .as_array()
        .unwrap()
        .iter()
        .map(|d| (d["burner"].as_str().unwrap(), d["state"].as_str().unwrap()))
        .collect();
    assert_eq!(
        states,
        [
            ("flexo-1", "burning"),
            ("flexo-1", "ready"),
            ("flexo-2", "refused")
        ]
    );
    assert!(
        page.contains("<progress value=\"3221225472\" max=\"8589934592\">"),
        "{page}"
    );
    assert!(page.contains("&lt;script&gt;") && !page.contains("<script>"));
    assert!(page.contains("docker build"), "the image build's step");
    // What each drive holds, by slot, the default marked.
    assert_eq!(
        json[1]["images"],
        serde_json::json!([
            {"slot": 1, "image": "car-v1.9", "default": false},
            {"slot": 2, "image": "car-v2.0", "default": true},
        ])
    );
    assert_eq!(json[2]["images"], serde_json::json!([]), "a refused drive");
    assert!(
        page.contains("2: <b>car-v2.0</b> (default)") && page.contains("1: car-v1.9"),
        "{page}"
    );

    let (base, key) = (
        format!("http://{}", stack.http),
        stack.keys.developer.clone(),
    );
    tokio::task::spawn_blocking(move || {
        let browser = Browser::start();
        browser.login(&base, &key);
        browser.go(&format!("{base}/fleet"));
        assert_eq!(browser.find_all("tr.drive").len(), 3);
        assert_eq!(browser.find_all("progress").len(), 1);
        assert_eq!(
            browser.find_all("span.held").len(),
            4,
            "two images on each of two drives"
        );
        let text = browser.text();
        assert!(text.contains("flexo-2") && text.contains("38%"), "{text}");
        browser.screenshot("fleet");
    })
    .await
    .unwrap();
}
