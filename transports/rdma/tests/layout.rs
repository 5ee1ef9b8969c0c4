//! Layout proof: every struct and union declared in `src/sys.rs` has the size, alignment and
//! field offsets of its C counterpart in `<infiniband/verbs.h>`.
//!
//! The test generates a C program from `verbs::abi_layouts()` (one `sizeof`/`_Alignof` per
//! type, one `offsetof` per declared field, by C name), compiles it with `cc` against the
//! installed header and compares every number with the Rust side. It fails on any mismatch,
//! and when the generated program does not compile (a field name that C does not have).
//!
//! Needs `cc` and the header from the Debian/Ubuntu package **`libibverbs-dev`** (CI installs
//! it). Without them it prints `SKIPPED: no <infiniband/verbs.h>` and passes.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::Command;

use ferroplasma_transport_rdma::verbs;

fn work_dir() -> PathBuf {
    let d = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("rdma-layout");
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Compiles `src` to an executable; `Err(stderr)` when cc is missing or fails.
fn compile(name: &str, src: &str) -> Result<PathBuf, String> {
    let dir = work_dir();
    let c = dir.join(format!("{name}.c"));
    let exe = dir.join(name);
    std::fs::write(&c, src).unwrap();
    let out = Command::new("cc")
        .arg("-std=gnu11")
        .arg("-o")
        .arg(&exe)
        .arg(&c)
        .output()
        .map_err(|e| format!("cannot run cc: {e}"))?;
    if out.status.success() {
        Ok(exe)
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// The C name of a Rust field (`r#type` is `type`).
fn c_field(name: &str) -> &str {
    name.strip_prefix("r#").unwrap_or(name)
}

#[test]
fn sys_layouts_match_verbs_h() {
    if let Err(e) = compile(
        "probe",
        "#include <infiniband/verbs.h>\nint main(void) { return sizeof(struct ibv_context) == 0; }\n",
    ) {
        println!("SKIPPED: no <infiniband/verbs.h> (install libibverbs-dev and a C compiler): {e}");
        return;
    }

    let layouts = verbs::abi_layouts();
    let mut src = String::from(
        "#include <stddef.h>\n#include <stdio.h>\n#include <infiniband/verbs.h>\nint main(void) {\n",
    );
    // Rust-side expectations, keyed like the C program's output lines.
    let mut expected: Vec<(String, usize)> = Vec::new();
    for (i, l) in layouts.iter().enumerate() {
        let t = l.c_type;
        writeln!(src, "  printf(\"T{i} size %zu\\n\", sizeof({t}));").unwrap();
        writeln!(src, "  printf(\"T{i} align %zu\\n\", _Alignof({t}));").unwrap();
        expected.push((format!("T{i} size"), l.size));
        expected.push((format!("T{i} align"), l.align));
        for (f, off) in l.fields {
            let cf = c_field(f);
            writeln!(src, "  printf(\"T{i} .{cf} %zu\\n\", offsetof({t}, {cf}));").unwrap();
            expected.push((format!("T{i} .{cf}"), *off));
        }
    }
    src.push_str("  return 0;\n}\n");

    let exe = compile("layout", &src)
        .unwrap_or_else(|e| panic!("the layout program does not compile against verbs.h:\n{e}"));
    let out = Command::new(&exe).output().expect("run the layout program");
    assert!(out.status.success(), "layout program failed: {out:?}");
    let text = String::from_utf8(out.stdout).unwrap();
    let got: Vec<(String, usize)> = text
        .lines()
        .map(|line| {
            let (k, v) = line.rsplit_once(' ').expect("key value");
            (k.to_owned(), v.parse().expect("a number"))
        })
        .collect();
    assert_eq!(
        got.len(),
        expected.len(),
        "C printed a different number of entries"
    );

    let mut mismatches = Vec::new();
    for ((ek, ev), (gk, gv)) in expected.iter().zip(&got) {
        assert_eq!(ek, gk, "output out of order");
        if ev != gv {
            let i: usize = ek[1..ek.find(' ').unwrap()].parse().unwrap();
            mismatches.push(format!(
                "{} {}: Rust {ev}, C {gv}",
                layouts[i].c_type,
                &ek[ek.find(' ').unwrap() + 1..]
            ));
        }
    }
    let fields: usize = layouts.iter().map(|l| l.fields.len()).sum();
    println!(
        "checked {} types, {fields} fields against <infiniband/verbs.h>",
        layouts.len()
    );
    assert!(
        mismatches.is_empty(),
        "ABI mismatches with verbs.h:\n{}",
        mismatches.join("\n")
    );
}
