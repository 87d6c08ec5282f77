//! `kube-proxy`: see the README. All logic lives in the library; this only hands over the
//! command line and turns the outcome into an exit code.

fn main() -> std::process::ExitCode {
    kube_proxy::app::main(std::env::args_os().collect())
}
