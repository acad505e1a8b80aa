//! A small command-line parser: `--name value` options and `--flag` switches, each consumed by
//! name, with anything left over reported as an error.

use std::str::FromStr;

pub struct Args {
    rest: Vec<String>,
}

impl Args {
    pub fn new(args: &[String]) -> Args {
        Args { rest: args.to_vec() }
    }

    /// Removes `--name` and returns whether it was there.
    pub fn flag(&mut self, name: &str) -> bool {
        match self.rest.iter().position(|a| a == name) {
            Some(index) => {
                self.rest.remove(index);
                true
            }
            None => false,
        }
    }

    /// Removes `--name VALUE` and returns the value.
    pub fn value(&mut self, name: &str) -> Result<Option<String>, String> {
        let Some(index) = self.rest.iter().position(|a| a == name) else {
            return Ok(None);
        };
        if index + 1 >= self.rest.len() {
            return Err(format!("{name} needs a value"));
        }
        let value = self.rest.remove(index + 1);
        self.rest.remove(index);
        Ok(Some(value))
    }

    /// Removes `--name VALUE` and parses the value.
    pub fn parsed<T: FromStr>(&mut self, name: &str) -> Result<Option<T>, String>
    where
        T::Err: std::fmt::Display,
    {
        match self.value(name)? {
            None => Ok(None),
            Some(text) => text.parse().map(Some).map_err(|e| format!("{name} {text}: {e}")),
        }
    }

    /// Fails on anything not consumed.
    pub fn finish(self) -> Result<(), String> {
        match self.rest.first() {
            None => Ok(()),
            Some(unknown) => Err(format!("unknown argument `{unknown}`")),
        }
    }
}
