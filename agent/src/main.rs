fn main() {
    println!("kvmagent: not yet wired");
}
