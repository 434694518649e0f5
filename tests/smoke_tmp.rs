use lazyfree::*;
use std::time::Instant;
fn gen(seed: u64, off: usize, buf: &mut [u8]) {
    for (i, b) in buf.iter_mut().enumerate() {
        let x = (seed ^ (off + i) as u64).wrapping_mul(0x9E3779B97F4A7C15);
        *b = (x >> 56) as u8;
    }
}
#[test]
fn smoke() {
    let c: Cache<u32> = Cache::new(Config::default()).unwrap();
    let e = c
        .insert(1, 1 << 20, |off, buf: &mut [u8]| {
            gen(1, off, buf);
            Ok::<(), RegenError>(())
        })
        .unwrap();
    let mut want = vec![0u8; 1 << 20];
    gen(1, 0, &mut want);
    assert!(e[..] == want[..]);
    println!("{}", c.stats());
    let t = Instant::now();
    let d = testing::reclaim(&e);
    println!("reclaim dropped {d} in {:?}", t.elapsed());
    assert!(e[..] == want[..]);
    let t = Instant::now();
    let d = testing::reclaim(&e);
    println!("reclaim after rebuild dropped {d} in {:?}", t.elapsed());
    {
        let _p = e.pin().unwrap();
    }
    let d = testing::reclaim(&e);
    println!("after pin/unpin dropped {d}");
    let e2 = c
        .insert_with(2, &want, |off, buf: &mut [u8]| {
            gen(1, off, buf);
            Ok::<(), RegenError>(())
        })
        .unwrap();
    let d = testing::reclaim(&e2);
    println!("insert_with dropped {d}");
    assert!(e2[..] == want[..]);
    println!("{}", c.stats());
}
