//! `mbtd bench products` through the real binary: one JSON line with every product of a
//! training step, and a clear error for an empty step.

use std::process::Command;

use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_mbtd");

fn run(args: &[&str]) -> std::process::Output {
    Command::new(BIN)
        .args(["bench", "products", "--preset", "small", "--repeats", "1"])
        .args(args)
        .output()
        .expect("run mbtd bench products")
}

#[test]
fn every_product_of_a_step_is_timed_in_either_precision() {
    for precision in ["f32", "bf16"] {
        let out = run(&["--tokens", "48", "--precision", precision]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let r: Value = serde_json::from_slice(&out.stdout).expect("one JSON line");
        assert_eq!(r["precision"], precision);
        let products = r["products"].as_array().expect("products");
        assert_eq!(products.len(), 15, "{r}");
        // the small preset: d 64, V 512; the forward of the head is tokens × d × V
        let head = &products[12];
        assert_eq!(
            (head["layer"].as_str(), head["product"].as_str()),
            (Some("head"), Some("forward"))
        );
        assert_eq!(
            (head["m"].as_u64(), head["k"].as_u64(), head["n"].as_u64()),
            (Some(48), Some(64), Some(512))
        );
        assert!(r["step_products_ms"].as_f64().unwrap() > 0.0, "{r}");
    }
}

#[test]
fn an_empty_step_is_refused_by_name() {
    let out = run(&["--tokens", "0"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--tokens"), "{err}");
}
