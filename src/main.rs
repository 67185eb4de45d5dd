fn main() -> std::process::ExitCode {
    gptaq_studio::cli::main()
}
