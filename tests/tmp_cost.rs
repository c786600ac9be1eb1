use std::{hint::black_box, time::Instant};
use smsgw::{phone::{Country, SenderId}, policy::sender, segments::{lookalikes::smart_encode, segment}};

#[test]
fn cost() {
    let texts = [
        "Reminder: your driving lesson with Sam is tomorrow at 10:00. Reply STOP to opt out.".to_owned(),
        "Reminder: you’re booked with Sam tomorrow at 10:00 – see you there…".to_owned(),
        "Cześć! Lekcja jutro o 10:00 – do zobaczenia".to_owned(),
    ];
    let n = 1_000_000;
    for text in &texts {
        let t = Instant::now();
        for _ in 0..n { black_box(segment(black_box(text))); }
        let seg = t.elapsed().as_nanos() as f64 / n as f64;
        let t = Instant::now();
        for _ in 0..n { black_box(smart_encode(black_box(text))); }
        let enc = t.elapsed().as_nanos() as f64 / n as f64;
        println!("segment {seg:.0} ns, smart_encode {enc:.0} ns: {}", &text[..10]);
    }
    let refusing: Vec<Country> = ["US","CA","PR","VI","GU","MP","AS","AR","BR","CL","CN","CO","CR","DO","EC","SV","GT","NI","PA","PE","PY","UY","VE"].into_iter().filter_map(Country::parse).collect();
    let alpha = SenderId::parse("DriveCo").unwrap();
    let gb = Country::parse("GB");
    let t = Instant::now();
    for _ in 0..n {
        let r = sender::refuses_alphanumeric(black_box(&refusing), black_box(gb));
        black_box(sender::choose(r, Some(&alpha), None, sender::ProviderSender::Number));
    }
    println!("sender choice {:.1} ns", t.elapsed().as_nanos() as f64 / n as f64);
}
