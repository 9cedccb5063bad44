//! The profile's global counters, alone in their own test binary (nothing else opens spans here).

use kiln_kernels::profile::{enable, matmul_span, span, take, Kind};
use std::time::Duration;

#[test]
fn counts_each_kind_once_while_open() {
    enable(true);
    {
        let _a = span(Kind::Norm);
        let _b = span(Kind::Norm); // nested, same kind: counted once
        std::thread::sleep(Duration::from_millis(20));
    }
    {
        let _m = matmul_span(2, 3, 4);
        std::thread::sleep(Duration::from_millis(10));
    }
    let p = take();
    enable(false);
    assert!(p.time(Kind::Norm) >= Duration::from_millis(20));
    assert!(
        p.time(Kind::Norm) < Duration::from_millis(39),
        "nested spans counted twice: {:?}",
        p.time(Kind::Norm)
    );
    assert!(p.time(Kind::Matmul) >= Duration::from_millis(10));
    assert_eq!(p.matmul_flops, 48);
    assert_eq!(p.time(Kind::Loss), Duration::ZERO);
    assert!(p.total() >= p.time(Kind::Norm) + p.time(Kind::Matmul));
    // Off: nothing is counted.
    {
        let _a = span(Kind::Loss);
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(take().total(), Duration::ZERO);
}
