//! Synthetic readings shared by the benches: `devices` devices at 1 Hz, in event-time order.

#![allow(dead_code)]

pub const T0: i64 = 1_767_225_600_000;

pub fn lines(devices: usize, seconds: usize) -> Vec<String> {
    let mut out = Vec::with_capacity(devices * seconds);
    let mut rng = fastrand::Rng::with_seed(7);
    for s in 0..seconds {
        for d in 0..devices {
            let ts = T0 + (s * 1000) as i64 + rng.i64(0..1000);
            out.push(format!(
                r#"{{"device_id":"bed-{d:05}","patient_id":"pat-{d:05}","ts":{ts},"seq":{s},"hr":{},"spo2":{},"temp":{:.1},"sys_bp":{},"dia_bp":{},"rr":{}}}"#,
                rng.i32(55..140),
                rng.i32(85..100),
                36.0 + rng.f64() * 4.0,
                rng.i32(90..150),
                rng.i32(55..95),
                rng.i32(10..25),
            ));
        }
    }
    out
}
