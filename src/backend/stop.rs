//! `StopMatcher`: ends an answer at a stop sequence found in the text, even
//! when it spans token boundaries, and never lets any of it reach the
//! client: text that could be the start of a stop sequence is held back
//! until the next piece decides.

pub struct StopMatcher {
    stops: Vec<String>,
    pending: String,
}

/// What a piece of text turned into.
#[derive(Debug, PartialEq, Eq)]
pub struct Released {
    /// Text that is safe to send.
    pub text: String,
    /// The stop sequence that matched: `text` is everything before it.
    pub stopped: Option<String>,
}

impl StopMatcher {
    pub fn new(stops: Vec<String>) -> Self {
        Self {
            stops: stops.into_iter().filter(|s| !s.is_empty()).collect(),
            pending: String::new(),
        }
    }

    /// Adds a piece of the answer; without stop sequences it passes
    /// straight through, uncopied.
    pub fn push(&mut self, piece: String) -> Released {
        if self.stops.is_empty() {
            return Released {
                text: piece,
                stopped: None,
            };
        }
        self.pending.push_str(&piece);
        let first_match = self
            .stops
            .iter()
            .filter_map(|s| self.pending.find(s.as_str()).map(|at| (at, s)))
            .min_by_key(|(at, _)| *at);
        if let Some((at, stop)) = first_match {
            let stop = stop.clone();
            self.pending.truncate(at);
            return Released {
                text: std::mem::take(&mut self.pending),
                stopped: Some(stop),
            };
        }
        let hold = self.held_back();
        let text = self.pending[..self.pending.len() - hold].to_owned();
        self.pending.drain(..self.pending.len() - hold);
        Released {
            text,
            stopped: None,
        }
    }

    /// Whatever was held back, once the answer ended without a match.
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.pending)
    }

    /// Length of the longest end of `pending` that begins a stop sequence.
    fn held_back(&self) -> usize {
        self.stops
            .iter()
            .flat_map(|stop| {
                (1..stop.len())
                    .rev()
                    .filter(|&n| stop.is_char_boundary(n) && self.pending.ends_with(&stop[..n]))
                    .take(1)
            })
            .max()
            .unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(stops: &[&str], pieces: &[&str]) -> (String, bool) {
        let mut m = StopMatcher::new(stops.iter().map(|s| (*s).to_owned()).collect());
        let mut out = String::new();
        for piece in pieces {
            let r = m.push((*piece).to_owned());
            out.push_str(&r.text);
            if r.stopped.is_some() {
                return (out, true);
            }
        }
        out.push_str(&m.finish());
        (out, false)
    }

    #[test]
    fn a_stop_split_across_pieces_ends_the_text_before_it() {
        assert_eq!(
            run(&["\n\n"], &["Hello", "\n", "\nmore"]),
            ("Hello".into(), true)
        );
        assert_eq!(run(&["END"], &["a E", "N", "D b"]), ("a ".into(), true));
    }

    #[test]
    fn a_near_miss_is_released_in_full() {
        assert_eq!(run(&["END"], &["a E", "N", "d"]), ("a ENd".into(), false));
        assert_eq!(run(&["END"], &["a EN"]), ("a EN".into(), false));
    }

    #[test]
    fn held_text_is_released_as_soon_as_it_cannot_match() {
        let mut m = StopMatcher::new(vec!["STOP".into()]);
        assert_eq!(m.push("go S".into()).text, "go ");
        assert_eq!(m.push("x".into()).text, "Sx");
    }

    #[test]
    fn the_earliest_of_several_stops_wins_and_characters_stay_whole() {
        assert_eq!(run(&["b", "a"], &["xxab"]), ("xx".into(), true));
        let mut m = StopMatcher::new(vec!["b".into(), "a".into()]);
        assert_eq!(m.push("xxab".into()).stopped.as_deref(), Some("a"));
        assert_eq!(run(&["é!"], &["caf", "é", "!"]), ("caf".into(), true));
        assert_eq!(run(&["é!"], &["café"]), ("café".into(), false));
    }

    #[test]
    fn without_stops_everything_passes_straight_through() {
        let mut m = StopMatcher::new(vec![String::new()]);
        assert_eq!(
            m.push("abc".into()),
            Released {
                text: "abc".into(),
                stopped: None
            }
        );
    }
}
